//! The deployment files: example configs pass `meshd check`, the
//! Kubernetes manifests validate offline (`kubernetes-validate --strict`),
//! the ConfigMap holds exactly the example configs, the Prometheus scrape
//! config and every Grafana panel query parse with promtool.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use meshd_tests::sys::workspace_binary;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Runs a tool the test needs (`cargo xtask setup` installs it); fails
/// loudly if it is missing. Returns (success, stdout + stderr).
fn tool(program: &str, args: &[&str], dir: &Path) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); `cargo xtask setup` installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Node names in the example mesh, and their node files.
fn nodes() -> Vec<String> {
    let mesh: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy().join("config/mesh.yaml")).expect("mesh.yaml"),
    )
    .expect("mesh.yaml is YAML");
    mesh["nodes"]
        .as_sequence()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn every_node_of_the_example_mesh_passes_meshd_check() {
    let config = deploy().join("config");
    for node in nodes() {
        let node_file = config.join(format!("{node}.yaml"));
        let output = Command::new(workspace_binary("meshd"))
            .args(["check", "--config"])
            .arg(config.join("mesh.yaml"))
            .arg("--config")
            .arg(&node_file)
            .output()
            .expect("meshd check");
        assert!(
            output.status.success(),
            "{} does not validate: {}",
            node_file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn the_kubernetes_manifests_validate_strictly() {
    let dir = deploy().join("kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let (ok, said) = tool("kubernetes-validate", &args, &dir);
    let tail: String = said.lines().rev().take(30).collect::<Vec<_>>().join("\n");
    assert!(ok, "kubernetes-validate --strict failed:\n{tail}");
    for file in &files {
        assert!(
            said.contains(&format!("{file} passed")),
            "{file} not validated:\n{said}"
        );
    }
}

#[test]
fn the_configmap_holds_the_node_template_and_discovery_completes_it_into_a_config_meshd_accepts() {
    let text =
        std::fs::read_to_string(deploy().join("kubernetes/configmap.yaml")).expect("configmap");
    let configmap: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let template = deploy().join("config/node-template.yaml");
    assert_eq!(
        configmap["data"]["node.yaml"].as_str(),
        Some(
            std::fs::read_to_string(&template)
                .expect("template")
                .as_str()
        ),
        "configmap.yaml's node.yaml differs from deploy/config/node-template.yaml"
    );
    let daemonset =
        std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).expect("daemonset");
    for arg in [
        "--node-config=/etc/meshd/node.yaml",
        "--out=/var/run/meshd/discovered",
        "--config=/var/run/meshd/discovered/meshd.yaml",
        "--node=$(NODE_NAME)",
        "fieldPath: spec.nodeName",
    ] {
        assert!(daemonset.contains(arg), "the DaemonSet lacks {arg}");
    }
    // The template, completed from Bookinfo's manifests for a node, is
    // what the DaemonSet's meshd runs with: `meshd check` accepts it.
    let manifests =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../meshd/tests/data/bookinfo/manifests");
    let out = std::env::temp_dir().join(format!("meshd-deploy-discover-{}", std::process::id()));
    let discover = Command::new(workspace_binary("meshd"))
        .arg("discover")
        .arg("--from-manifests")
        .arg(&manifests)
        .args(["--node", "node-a", "--node-config"])
        .arg(&template)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("meshd discover");
    assert!(
        discover.status.success(),
        "{}",
        String::from_utf8_lossy(&discover.stderr)
    );
    let check = Command::new(workspace_binary("meshd"))
        .args(["check", "--config"])
        .arg(out.join("meshd.yaml"))
        .output()
        .expect("meshd check");
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout)
        .contains("node node-a with 8 services and 3 workloads"));
}

#[test]
fn the_discover_role_can_only_read_the_kinds_it_translates() {
    let text = std::fs::read_to_string(deploy().join("kubernetes/rbac.yaml")).expect("rbac");
    let role: serde_yaml::Value = text
        .split("\n---\n")
        .map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).expect("YAML"))
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let mut granted = Vec::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let verbs: Vec<&str> = rule["verbs"]
            .as_sequence()
            .expect("verbs")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
        for group in rule["apiGroups"].as_sequence().expect("groups") {
            for resource in rule["resources"].as_sequence().expect("resources") {
                granted.push(format!(
                    "{}/{}",
                    group.as_str().unwrap(),
                    resource.as_str().unwrap()
                ));
            }
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/nodes",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices",
            "gateway.networking.k8s.io/httproutes",
            "networking.istio.io/destinationrules",
            "security.istio.io/authorizationpolicies",
            "security.istio.io/peerauthentications",
        ]
    );
    // The token is mounted into the discover container alone.
    let daemonset: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).expect("daemonset"),
    )
    .expect("YAML");
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["automountServiceAccountToken"], false);
    let token_mounts = |containers: &serde_yaml::Value| -> Vec<String> {
        containers
            .as_sequence()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["volumeMounts"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|m| m["name"] == "api-token")
            })
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(token_mounts(&spec["initContainers"]), ["discover"]);
    assert!(token_mounts(&spec["containers"]).is_empty());
}

#[test]
fn the_prometheus_config_and_every_dashboard_query_parse() {
    let dir = std::env::temp_dir().join(format!("meshd-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Debian's promtool is built without Kubernetes discovery: check the
    // rest of the scrape config (relabelling) with a static target.
    let scrape = std::fs::read_to_string(deploy().join("prometheus/prometheus.yml"))
        .expect("prometheus.yml");
    let discovery = "    kubernetes_sd_configs:\n      - role: pod\n        namespaces: { names: [meshd-system] }\n";
    assert!(scrape.contains(discovery));
    let checkable = scrape.replace(
        discovery,
        "    static_configs: [{ targets: ['127.0.0.1:15020'] }]\n",
    );
    std::fs::write(dir.join("prometheus.yml"), checkable).expect("write");
    let (ok, said) = tool("promtool", &["check", "config", "prometheus.yml"], &dir);
    assert!(ok, "{said}");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/meshd-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_owned())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(expr).expect("quote")
        ));
    }
    std::fs::write(dir.join("rules.yml"), rules).expect("write");
    let (ok, said) = tool("promtool", &["check", "rules", "rules.yml"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "a dashboard query does not parse: {said}");
}
