//! `meshd discover`'s translation, checked against golden files: the
//! Bookinfo application as Kubernetes manifests (`tests/data/bookinfo/
//! manifests`) becomes, for each node, the files in `golden/<node>/`.
//! Regenerate them after a deliberate change with
//! `MESHD_BLESS=1 cargo test -p meshd --test discover` and review the diff.

use std::path::{Path, PathBuf};

use meshd::discover::{
    cluster::Cluster, manifests, translate::translate, Settings, Translation, MESH_FILE,
    WORKLOADS_FILE,
};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bookinfo")
}

fn settings(node: &str) -> Settings {
    Settings {
        node: node.to_owned(),
        trust_domain: "cluster.local".to_owned(),
        cluster_name: "Kubernetes".to_owned(),
        root_namespace: "istio-system".to_owned(),
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
    meshd::discover::load(translation, node).unwrap_or_else(|e| panic!("meshd refuses it:\n{e}"))
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
