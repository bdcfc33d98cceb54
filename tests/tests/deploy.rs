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
fn the_configmap_holds_the_example_configs_and_every_node_file_the_daemonset_asks_for() {
    let text =
        std::fs::read_to_string(deploy().join("kubernetes/configmap.yaml")).expect("configmap");
    let configmap: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let data = configmap["data"].as_mapping().expect("data");
    let mut names = vec!["mesh".to_owned()];
    names.extend(nodes());
    for name in &names {
        let key = format!("{name}.yaml");
        let file =
            std::fs::read_to_string(deploy().join("config").join(&key)).expect("config file");
        assert_eq!(
            data.get(key.as_str()).and_then(|v| v.as_str()),
            Some(file.as_str()),
            "configmap.yaml's {key} differs from deploy/config/{key}"
        );
    }
    let daemonset =
        std::fs::read_to_string(deploy().join("kubernetes/daemonset.yaml")).expect("daemonset");
    assert!(daemonset.contains("--config=/etc/meshd/mesh.yaml"));
    assert!(daemonset.contains("--config=/etc/meshd/$(NODE_NAME).yaml"));
    assert!(daemonset.contains("fieldPath: spec.nodeName"));
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
