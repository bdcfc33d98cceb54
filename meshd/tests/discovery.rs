//! `meshd discover`'s translation, checked against golden files: the
//! Bookinfo application as Kubernetes manifests (`tests/data/bookinfo/
//! manifests`) becomes, for each node, the files in `golden/<node>/`.
//! Regenerate them after a deliberate change with
//! `MESHD_BLESS=1 cargo test -p meshd --test discovery` and review the diff.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use meshd::config::MeshMode;

use meshd::discovery::{cluster::Cluster, manifests, translate::translate, Settings, Translation};

/// The golden files of a translation's parts.
const MESH_FILE: &str = "mesh.yaml";
const WORKLOADS_FILE: &str = "workloads.yaml";

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bookinfo")
}

fn settings(node: &str) -> Settings {
    Settings {
        node: node.to_owned(),
        trust_domain: "cluster.local".to_owned(),
        cluster_name: "Kubernetes".to_owned(),
        root_namespace: "istio-system".to_owned(),
        node_config: None,
    }
}

fn bookinfo() -> Cluster {
    manifests::read_dir(&data().join("manifests")).expect("the manifests read")
}

/// The golden file's text; with `MESHD_BLESS` set, `text` is written as it.
fn golden(node: &str, file: &str, text: &str) -> String {
    let path = data().join("golden").join(node).join(file);
    if std::env::var_os("MESHD_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (MESHD_BLESS=1 writes it)", path.display()))
}

fn unsupported_text(translation: &Translation) -> String {
    translation
        .unsupported
        .iter()
        .map(|u| {
            format!(
                "{} {} {}: {}\n",
                u.kind.as_str(),
                u.object,
                u.field,
                u.detail
            )
        })
        .collect()
}

#[test]
fn bookinfo_manifests_become_each_nodes_files() {
    let cluster = bookinfo();
    for node in ["node-a", "node-b"] {
        let translation = translate(&cluster, &settings(node));
        assert_eq!(
            translation.mesh,
            golden(node, MESH_FILE, &translation.mesh),
            "{node}"
        );
        assert_eq!(
            translation.workloads,
            golden(node, WORKLOADS_FILE, &translation.workloads),
            "{node}"
        );
        let unsupported = unsupported_text(&translation);
        assert_eq!(
            unsupported,
            golden(node, "unsupported.txt", &unsupported),
            "{node}"
        );
    }
}

#[test]
fn the_mesh_file_is_the_same_on_every_node_and_workloads_are_the_nodes_own() {
    let cluster = bookinfo();
    let a = translate(&cluster, &settings("node-a"));
    let b = translate(&cluster, &settings("node-b"));
    assert_eq!(a.mesh, b.mesh);
    for (translation, own, other) in [(&a, "node-a", "node-b"), (&b, "node-b", "node-a")] {
        let config = load(own, translation);
        assert!(!config.workloads.is_empty(), "{own}");
        // Every workload of the config is one of this node's endpoints.
        for workload in &config.workloads {
            let on = config
                .services
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .find(|e| e.workload == workload.name)
                .and_then(|e| e.node.clone());
            assert_eq!(
                on.as_deref(),
                Some(own),
                "{} placed on {other}?",
                workload.name
            );
        }
    }
}

/// The files as meshd itself loads them.
fn load(node: &str, translation: &Translation) -> meshd::config::Config {
    meshd::discovery::load(translation, node, false)
        .unwrap_or_else(|e| panic!("meshd refuses it:\n{e}"))
}

#[test]
fn the_same_objects_in_another_order_give_the_same_bytes() {
    let dir = data().join("manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.reverse();
    let mut objects = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        objects.extend(manifests::parse(path, &text).unwrap());
    }
    objects.reverse();
    let mut cluster = Cluster::default();
    for object in objects {
        cluster.apply(object);
    }
    for node in ["node-a", "node-b"] {
        assert_eq!(
            translate(&cluster, &settings(node)),
            translate(&bookinfo(), &settings(node)),
            "{node}"
        );
    }
}

#[test]
fn a_malformed_manifest_names_its_file_and_document() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: x}\nspec: {ports: [{port: not-a-number}]}\n";
    let err = manifests::parse(Path::new("broken.yaml"), text)
        .expect_err("a port that is no number is refused");
    let message = err.to_string();
    assert!(
        message.starts_with("broken.yaml: document 2: Service x/b:"),
        "{message}"
    );
}

#[test]
fn a_policy_discovery_cannot_translate_stops_it_instead_of_being_left_out() {
    let text = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: bookinfo}\nspec: {}\n";
    let err = manifests::parse(Path::new("policy.yaml"), text)
        .expect_err("a policy left out would give more access than it does");
    assert!(err.to_string().contains("is not translated"), "{err}");
}

mod watch_path {
    //! The API path, fed with kube-rs watcher events built from the same
    //! manifests: an initial list of every kind, then changes, deletions
    //! and a restarted watch's relist.

    use kube::runtime::watcher::Event;
    use meshd::discovery::{
        cluster::{Kind, Object},
        watch::{change_of, Update, Watched},
    };

    use super::*;

    pub(super) fn objects() -> Vec<Object> {
        let dir = data().join("manifests");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|path| {
                manifests::parse(path, &std::fs::read_to_string(path).unwrap()).unwrap()
            })
            .collect()
    }

    const KINDS: [Kind; 8] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Node,
        Kind::HttpRoute,
        Kind::DestinationRule,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ];

    fn event(watched: &mut Watched, kind: Kind, event: Event<Object>) {
        watched.update(change_of(kind, event, Ok));
    }

    /// Each kind listed as a watch's first list brings it.
    fn listed(objects: &[Object]) -> Watched {
        let mut watched = Watched::default();
        for kind in KINDS {
            event(&mut watched, kind, Event::Init);
            for object in objects.iter().filter(|o| o.kind() == kind) {
                event(&mut watched, kind, Event::InitApply(object.clone()));
            }
            assert!(!watched.ready(), "ready before every kind was listed");
            event(&mut watched, kind, Event::InitDone);
        }
        watched
    }

    fn find(objects: &[Object], kind: Kind, name: &str) -> Object {
        objects
            .iter()
            .find(|o| o.kind() == kind && o.key().1 == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .clone()
    }

    #[test]
    fn the_first_lists_give_the_golden_files() {
        let watched = listed(&objects());
        assert!(watched.ready());
        for node in ["node-a", "node-b"] {
            let translation = translate(&watched.cluster, &settings(node));
            assert_eq!(translation.mesh, golden(node, MESH_FILE, &translation.mesh));
            assert_eq!(
                translation.workloads,
                golden(node, WORKLOADS_FILE, &translation.workloads)
            );
        }
    }

    #[test]
    fn a_pod_moving_to_the_other_node_is_followed_on_both() {
        let objects = objects();
        let mut watched = listed(&objects);
        // reviews-v2 is rescheduled from node-b to node-a with a new
        // address: its Pod and the slices of reviews and reviews-v2 change.
        let Object::Pod(mut pod) = find(&objects, Kind::Pod, "reviews-v2-6f8d9c7b5-d3e4f") else {
            unreachable!()
        };
        pod.spec.as_mut().unwrap().node_name = Some("node-a".into());
        let status = pod.status.as_mut().unwrap();
        status.pod_ip = Some("10.244.1.23".into());
        status.pod_ips.as_mut().unwrap()[0].ip = "10.244.1.23".into();
        event(&mut watched, Kind::Pod, Event::Apply(Object::Pod(pod)));
        for slice in ["reviews-k9x2m", "reviews-v2-7hq2x"] {
            let Object::EndpointSlice(mut slice) = find(&objects, Kind::EndpointSlice, slice)
            else {
                unreachable!()
            };
            for endpoint in slice.endpoints.iter_mut().flatten() {
                if endpoint.addresses == ["10.244.2.23"] {
                    endpoint.addresses = vec!["10.244.1.23".into()];
                    endpoint.node_name = Some("node-a".into());
                }
            }
            event(
                &mut watched,
                Kind::EndpointSlice,
                Event::Apply(Object::EndpointSlice(slice)),
            );
        }
        let a = load("node-a", &translate(&watched.cluster, &settings("node-a")));
        let b = load("node-b", &translate(&watched.cluster, &settings("node-b")));
        let reviews = a.services.iter().find(|s| &*s.name == "reviews").unwrap();
        let moved = reviews
            .endpoints
            .iter()
            .find(|e| e.address.to_string() == "10.244.1.23")
            .expect("the new address is an endpoint");
        assert_eq!(moved.node.as_deref(), Some("node-a"));
        assert!(!reviews
            .endpoints
            .iter()
            .any(|e| e.address.to_string() == "10.244.2.23"));
        let on = |config: &meshd::config::Config| {
            config
                .workloads
                .iter()
                .any(|w| &*w.name == "reviews-v2-6f8d9c7b5-d3e4f")
        };
        assert!(
            on(&a) && !on(&b),
            "the pod is node-a's workload now, and no longer node-b's"
        );
    }

    #[test]
    fn a_deleted_policy_and_what_a_relist_no_longer_shows_are_gone() {
        let objects = objects();
        let mut watched = listed(&objects);
        let policies = |watched: &Watched| {
            load("node-a", &translate(&watched.cluster, &settings("node-a")))
                .policies
                .iter()
                .map(|p| p.name.to_string())
                .collect::<Vec<_>>()
        };
        assert!(policies(&watched).contains(&"bookinfo/allow-nothing".to_owned()));
        let allow_nothing = find(&objects, Kind::AuthorizationPolicy, "allow-nothing");
        event(
            &mut watched,
            Kind::AuthorizationPolicy,
            Event::Delete(allow_nothing),
        );
        assert!(!policies(&watched).contains(&"bookinfo/allow-nothing".to_owned()));
        // A restarted Service watch relists without mongodb (deleted while
        // the watch was away). Until the relist is done the files stay as
        // they were; then mongodb is gone and everything else is there.
        let before = translate(&watched.cluster, &settings("node-a"));
        event(&mut watched, Kind::Service, Event::Init);
        for object in objects
            .iter()
            .filter(|o| o.kind() == Kind::Service && o.key().1 != "mongodb")
        {
            event(
                &mut watched,
                Kind::Service,
                Event::InitApply(object.clone()),
            );
            assert_eq!(translate(&watched.cluster, &settings("node-a")), before);
        }
        event(&mut watched, Kind::Service, Event::InitDone);
        let after = load("node-a", &translate(&watched.cluster, &settings("node-a")));
        let names: Vec<_> = after.services.iter().map(|s| s.name.to_string()).collect();
        assert!(!names.contains(&"mongodb".to_owned()), "{names:?}");
        assert_eq!(
            names.len(),
            before.mesh.matches("\"vip\":").count() - 1,
            "{names:?}"
        );
    }

    #[test]
    fn an_unreadable_policy_holds_the_files_back_until_it_is_readable_or_gone() {
        let objects = objects();
        let mut watched = listed(&objects);
        let key = ("bookinfo".to_owned(), "broken".to_owned());
        watched.update(Update::Unreadable(
            Kind::AuthorizationPolicy,
            key.clone(),
            "spec.rules: invalid type".into(),
        ));
        assert!(
            !watched.ready(),
            "files written without a policy that could not be read"
        );
        watched.update(change_of(
            Kind::AuthorizationPolicy,
            Event::Delete(Object::from_value(
                serde_yaml::from_str(
                    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: bookinfo}\nspec: {}\n",
                )
                .unwrap(),
            )
            .unwrap()
            .unwrap()),
            Ok,
        ));
        assert!(watched.ready());
        // A kind whose CRD is not installed counts as listed, with nothing.
        let mut bare = Watched::default();
        for kind in &KINDS[..4] {
            bare.update(change_of(*kind, Event::Init, Ok));
            bare.update(change_of(*kind, Event::InitDone, Ok));
        }
        assert!(!bare.ready());
        for kind in &KINDS[4..] {
            bare.update(Update::Absent(*kind));
        }
        assert!(bare.ready());
    }
}

mod report {
    //! What discover says while it watches: its metrics and `/status`, as
    //! the watch loop feeds them, and served on its own listeners.

    use std::time::{Duration, SystemTime};

    use kube::runtime::watcher::Event;
    use meshd::discovery::{
        cluster::{Kind, Object},
        report::{render_status, Addresses, Report, Written},
        watch::{change_of, Update, Watched},
    };

    use super::*;

    fn take(report: &Report, watched: &mut Watched, update: Update, now: SystemTime) {
        report.observed(&update, now);
        watched.update(update);
        report.held(watched);
    }

    /// The sample of `series` (name and labels as rendered) in `text`.
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn the_report_says_what_is_watched_what_was_left_out_and_how_stale_the_files_are() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let report = Report::new("node-a", Path::new("/out/meshd.yaml"));
        let mut watched = Watched::default();
        let cluster = bookinfo();
        let objects: Vec<Object> = super::watch_path::objects();
        for kind in [
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Pod,
            Kind::Node,
            Kind::HttpRoute,
            Kind::DestinationRule,
            Kind::PeerAuthentication,
        ] {
            take(&report, &mut watched, change_of(kind, Event::Init, Ok), t0);
            for object in objects.iter().filter(|o| o.kind() == kind) {
                take(
                    &report,
                    &mut watched,
                    change_of(kind, Event::InitApply(object.clone()), Ok),
                    t0,
                );
            }
            take(
                &report,
                &mut watched,
                change_of(kind, Event::InitDone, Ok),
                t0,
            );
        }
        // AuthorizationPolicy not listed yet: nothing written, not in sync.
        let status = report.status(t0);
        assert_eq!(status["synced"], false, "{status:#}");
        take(
            &report,
            &mut watched,
            change_of(Kind::AuthorizationPolicy, Event::Init, Ok),
            t0,
        );
        for object in objects
            .iter()
            .filter(|o| o.kind() == Kind::AuthorizationPolicy)
        {
            take(
                &report,
                &mut watched,
                change_of(
                    Kind::AuthorizationPolicy,
                    Event::InitApply(object.clone()),
                    Ok,
                ),
                t0,
            );
        }
        take(
            &report,
            &mut watched,
            change_of(Kind::AuthorizationPolicy, Event::InitDone, Ok),
            t0,
        );
        assert!(watched.ready());
        let translation = translate(&watched.cluster, &settings("node-a"));
        assert!(
            !translation.unsupported.is_empty(),
            "the manifests have unsupported fields"
        );
        let new = report.translated(&translation.unsupported);
        assert_eq!(new, translation.unsupported, "all are new at first");
        assert!(
            report.translated(&translation.unsupported).is_empty(),
            "the same findings again are not new"
        );
        report.wrote(Written::Written, t0);

        let metrics = report.render_metrics(t0 + Duration::from_secs(5));
        let first = &translation.unsupported[0];
        let of_first = translation
            .unsupported
            .iter()
            .filter(|u| u.kind == first.kind && u.field == first.field)
            .count();
        let labels = format!(
            "{{kind=\"{}\",field=\"{}\"}}",
            first.kind.as_str(),
            first.field
        );
        assert_eq!(
            sample(
                &metrics,
                &format!("meshd_discovery_unsupported_total{labels}")
            ),
            of_first as f64,
            "counted once each, not per translation"
        );
        assert_eq!(
            sample(
                &metrics,
                &format!("meshd_discovery_unsupported_fields{labels}")
            ),
            of_first as f64
        );
        assert_eq!(
            sample(&metrics, "meshd_discovery_objects{kind=\"Service\"}"),
            cluster.services.len() as f64
        );
        assert_eq!(
            sample(&metrics, "meshd_discovery_watch_connected{kind=\"Pod\"}"),
            1.0
        );
        assert_eq!(
            sample(&metrics, "meshd_discovery_writes_total{result=\"written\"}"),
            1.0
        );
        assert_eq!(
            sample(&metrics, "meshd_discovery_last_write_timestamp_seconds"),
            1_800_000_000.0
        );
        // In sync: the last sync is now, whenever scraped.
        assert_eq!(
            sample(&metrics, "meshd_discovery_last_sync_timestamp_seconds"),
            1_800_000_005.0
        );

        // The API server goes away: the files keep serving, and say how
        // long they have been out of date.
        let t1 = t0 + Duration::from_secs(10);
        take(
            &report,
            &mut watched,
            Update::Error(Kind::Service, "connection refused".into()),
            t1,
        );
        let metrics = report.render_metrics(t1 + Duration::from_secs(60));
        assert_eq!(
            sample(
                &metrics,
                "meshd_discovery_watch_connected{kind=\"Service\"}"
            ),
            0.0
        );
        assert_eq!(
            sample(
                &metrics,
                "meshd_discovery_watch_errors_total{kind=\"Service\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&metrics, "meshd_discovery_last_sync_timestamp_seconds"),
            1_800_000_005.0,
            "stale files are not reported in sync"
        );
        let status = report.status(t1 + Duration::from_secs(60));
        assert_eq!(status["synced"], false);
        let shown = render_status(&status);
        for expected in ["NOT IN SYNC", "RETRYING", "connection refused", first.field] {
            assert!(shown.contains(expected), "no {expected:?} in\n{shown}");
        }

        // A finding that goes away is no longer current, but stays counted.
        let rest: Vec<_> = translation
            .unsupported
            .iter()
            .filter(|u| !(u.kind == first.kind && u.field == first.field))
            .cloned()
            .collect();
        assert!(report.translated(&rest).is_empty());
        let metrics = report.render_metrics(t1);
        assert_eq!(
            sample(
                &metrics,
                &format!("meshd_discovery_unsupported_fields{labels}")
            ),
            0.0
        );
        assert_eq!(
            sample(
                &metrics,
                &format!("meshd_discovery_unsupported_total{labels}")
            ),
            of_first as f64
        );
    }

    #[tokio::test]
    async fn discover_serves_metrics_to_prometheus_and_status_on_loopback_only() {
        let report = std::sync::Arc::new(Report::new("node-a", Path::new("/out/meshd.yaml")));
        let any = "127.0.0.1:0".parse().unwrap();
        let bound = meshd::discovery::report::serve(
            report,
            Addresses {
                metrics: any,
                admin: any,
            },
        )
        .await
        .expect("listens");
        let get = |address, path: &'static str| {
            tokio::task::spawn_blocking(move || {
                meshd::admin::api::http_get(address, "localhost", path)
            })
        };
        let metrics = get(bound.metrics, "/metrics")
            .await
            .unwrap()
            .expect("/metrics");
        assert!(
            metrics.contains("# TYPE meshd_discovery_unreadable_objects gauge"),
            "{metrics}"
        );
        let status = get(bound.admin, "/status").await.unwrap().expect("/status");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["node"], "node-a");
        // The status names objects: not on the address Prometheus reaches.
        let err = get(bound.metrics, "/status")
            .await
            .unwrap()
            .expect_err("status on metrics");
        assert!(err.to_string().contains("404"), "{err}");
        let err = get(bound.admin, "/metrics")
            .await
            .unwrap()
            .expect_err("metrics on admin");
        assert!(err.to_string().contains("404"), "{err}");
    }
}

#[test]
fn with_the_operators_node_settings_the_file_is_a_whole_config() {
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/node-template.yaml");
    let node_config = meshd::discovery::read_node_config(&template).expect("the template reads");
    let cluster = bookinfo();
    for (node, address) in [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")] {
        let completed = Settings {
            node_config: Some(node_config.clone()),
            ..settings(node)
        };
        let translation = translate(&cluster, &completed);
        let config = meshd::discovery::load(&translation, node, true)
            .unwrap_or_else(|e| panic!("meshd refuses it:\n{e}"));
        assert_eq!(&*config.node.name, node);
        assert_eq!(
            config.node.capture_address.to_string(),
            address,
            "the Node's InternalIP"
        );
        assert_eq!(
            config.services.len(),
            load(node, &translate(&cluster, &settings(node)))
                .services
                .len()
        );
    }
    // A node config may not bring what discovery writes.
    let dir = std::env::temp_dir().join(format!("meshd-node-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("node.yaml");
    std::fs::write(&bad, "node: { podCgroup: /kubepods }\nservices: []\n").unwrap();
    let err = meshd::discovery::read_node_config(&bad).expect_err("services are discovery's");
    assert!(
        err.to_string().contains("services is written by discovery"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Objects a namespace's own users may write (EndpointSlices, HTTPRoutes,
/// DestinationRules) must not make the mesh's config one meshd refuses:
/// that would stop every later change for every node.
#[test]
fn hostile_objects_are_left_out_and_the_rest_still_loads() {
    let mut cluster = bookinfo();
    let hostile = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: details-evil
  namespace: bookinfo
  labels: { kubernetes.io/service-name: details }
addressType: IPv4
ports: [{ name: http, port: 9080, protocol: TCP }]
endpoints:
# the VIP of another service
- addresses: [10.96.0.22]
  conditions: { ready: true }
# ratings' pod's address, claimed for details with details' pod
- addresses: [10.244.2.22]
  conditions: { ready: true }
  nodeName: node-b
  targetRef: { kind: Pod, name: details-v1-7f9c6d5b8-q8w2n, namespace: bookinfo }
# a pod of another namespace
- addresses: [10.244.9.9]
  conditions: { ready: true }
  targetRef: { kind: Pod, name: x, namespace: kube-system }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: evil, namespace: bookinfo }
spec:
  parentRefs: [{ group: "", kind: Service, name: details }]
  rules:
  - matches:
    - path: { type: RegularExpression, value: "((" }
    - headers: [{ name: "bad header", value: x }]
    backendRefs: [{ name: details, port: 9080 }]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: details, namespace: bookinfo }
spec:
  host: details
  trafficPolicy:
    outlierDetection: { consecutive5xxErrors: 2, baseEjectionTime: 15m, maxEjectionPercent: 300 }
"#;
    for object in manifests::parse(Path::new("hostile.yaml"), hostile).unwrap() {
        cluster.apply(object);
    }
    let translation = translate(&cluster, &settings("node-a"));
    let config = load("node-a", &translation);
    let details = config
        .services
        .iter()
        .find(|s| &*s.name == "details")
        .unwrap();
    let addresses: Vec<String> = details
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    assert_eq!(addresses, ["10.244.2.21"], "only details' own pod");
    let fields: Vec<&str> = translation.unsupported.iter().map(|u| u.field).collect();
    for field in [
        "endpoints.addresses",
        "endpoints.targetRef",
        "spec.rules.matches.path",
        "spec.rules.matches.headers.name",
    ] {
        assert!(fields.contains(&field), "{field} not reported: {fields:?}");
    }
}

/// The mode `load`ed for each of node-a's workloads by its `app` label.
fn modes_by_app(
    cluster: &Cluster,
) -> (
    String,
    BTreeMap<String, Option<MeshMode>>,
    Vec<&'static str>,
) {
    let translation = translate(cluster, &settings("node-a"));
    let config = load("node-a", &translation);
    let modes = config
        .workloads
        .iter()
        .map(|w| (w.labels["app"].clone(), w.mtls_mode))
        .collect();
    let fields = translation.unsupported.iter().map(|u| u.field).collect();
    (format!("{:?}", config.mesh.mode), modes, fields)
}

fn apply(cluster: &mut Cluster, yaml: &str) {
    for object in manifests::parse(Path::new("peer.yaml"), yaml).unwrap() {
        cluster.apply(object);
    }
}

#[test]
fn peer_authentication_sets_each_workloads_mode_as_istio_resolves_it() {
    // Bookinfo's mesh is STRICT; its namespace relaxes it, reviews' own
    // policy makes it strict again (a PERMISSIVE port cannot be: per pod).
    let mut cluster = bookinfo();
    apply(
        &mut cluster,
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: relaxed, namespace: bookinfo }
spec: { mtls: { mode: PERMISSIVE } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: reviews, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  mtls: { mode: STRICT }
  portLevelMtls: { "9080": { mode: PERMISSIVE } }
"#,
    );
    let (mesh, modes, fields) = modes_by_app(&cluster);
    assert_eq!(mesh, "Strict");
    assert_eq!(
        modes["productpage"],
        Some(MeshMode::Permissive),
        "{modes:?}"
    );
    assert_eq!(modes["reviews"], None, "the mesh's mode: {modes:?}");
    assert!(fields.contains(&"spec.portLevelMtls"), "{fields:?}");

    // A permissive mesh: a workload's STRICT, and a STRICT port, make
    // those workloads strict; UNSET inherits.
    apply(
        &mut cluster,
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: default, namespace: istio-system }
spec: { mtls: { mode: PERMISSIVE } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: relaxed, namespace: bookinfo }
spec: { mtls: { mode: UNSET } }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: reviews, namespace: bookinfo }
spec:
  selector: { matchLabels: { app: reviews } }
  portLevelMtls: { "9080": { mode: STRICT } }
"#,
    );
    let (mesh, modes, _) = modes_by_app(&cluster);
    assert_eq!(mesh, "Permissive");
    assert_eq!(modes["productpage"], None, "{modes:?}");
    assert_eq!(modes["reviews"], Some(MeshMode::Strict), "{modes:?}");

    // A selector meshd cannot read: a STRICT one is strict on the whole
    // namespace rather than leave plaintext in.
    apply(
        &mut cluster,
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: unread, namespace: bookinfo }
spec:
  selector: { matchExpressions: [{ key: app, operator: In, values: [productpage] }] }
  mtls: { mode: STRICT }
"#,
    );
    let (_, modes, fields) = modes_by_app(&cluster);
    assert_eq!(modes["productpage"], Some(MeshMode::Strict), "{modes:?}");
    assert!(fields.contains(&"spec.selector"), "{fields:?}");
}
