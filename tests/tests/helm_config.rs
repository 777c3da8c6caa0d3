//! The Helm chart's cluster config: renders `helm/fathom` (through `scripts/helm-check.sh render`,
//! Helm v4 embedded in helm-python-sdk, offline) for the default values and every CI variant, and
//! checks that what the pods would read is right: the ConfigMap's `cluster.toml` parses as the
//! real `ClusterConfig` (unknown keys are errors), its world size is the worker StatefulSet's
//! replicas, tp and etcd endpoints follow the values, and the pod specs run the documented
//! commands with the worker id from the downward API.
//!
//! Needs the chart tools that `scripts/deps.sh` installs; without them every test here fails
//! with a message saying so (they never skip).

use anyhow::{Context, Result, bail, ensure};
use fathom_common::cluster::ClusterConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const NAMESPACE: &str = "fathom-ci";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// One rendered release: the merged values and the manifests as JSON objects.
struct Rendered {
    variant: String,
    values: Value,
    manifests: Vec<Value>,
    notes: String,
}

/// Runs `scripts/helm-check.sh render VARIANT`; `Err` carries the script's stderr.
fn try_render(variant: &str) -> Result<Rendered> {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/helm-check.sh"))
        .args(["render", variant])
        .current_dir(repo_root())
        .output()
        .context("running bash scripts/helm-check.sh")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!(
            "the Helm chart tools are not installed: run scripts/deps.sh (it installs \
             helm-python-sdk, kubernetes-validate and yamllint into \
             ${{FATHOM_TOOLS_VENV:-$HOME/.cache/fathom/tools-venv}}).\n{stderr}"
        );
    }
    if !out.status.success() {
        bail!("render of {variant} failed ({}): {stderr}", out.status);
    }
    let mut v: Value = serde_json::from_slice(&out.stdout).context("render output is JSON")?;
    let manifests = match v["manifests"].take() {
        Value::Array(a) => a,
        other => bail!("manifests is not a list: {other}"),
    };
    Ok(Rendered {
        variant: variant.into(),
        values: v["values"].take(),
        manifests,
        notes: v["notes"].as_str().unwrap_or_default().into(),
    })
}

fn render(variant: &str) -> Rendered {
    try_render(variant).unwrap_or_else(|e| panic!("{e:#}"))
}

impl Rendered {
    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.manifests.iter().find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("{}: no {kind}/{name} rendered", self.variant))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.manifests.iter().filter(|m| m["kind"] == kind).collect()
    }

    /// `cluster.toml` from a ConfigMap or Secret, parsed by the real `ClusterConfig`.
    fn cluster_config(&self, kind: &str, name: &str) -> ClusterConfig {
        let obj = self.get(kind, name);
        let field = if kind == "Secret" { "stringData" } else { "data" };
        let text = obj[field]["cluster.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {kind}/{name} has no cluster.toml", self.variant));
        ClusterConfig::from_toml_str(text, &format!("{}: {kind}/{name}", self.variant))
            .unwrap_or_else(|e| panic!("{e}\n--- cluster.toml ---\n{text}"))
    }

    fn pod_spec(&self, kind: &str, name: &str) -> &Value {
        &self.get(kind, name)["spec"]["template"]["spec"]
    }

    fn container<'a>(&'a self, kind: &str, name: &str, container: &str) -> &'a Value {
        self.pod_spec(kind, name)["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == container))
            .unwrap_or_else(|| {
                panic!("{}: {kind}/{name} has no container {container}", self.variant)
            })
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

fn as_usize(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count")) as usize
}

/// Where a volume named `name` is mounted in `container`, and whether read-only.
fn mount<'a>(container: &'a Value, name: &str) -> Option<(&'a str, bool)> {
    container["volumeMounts"].as_array()?.iter().find(|m| m["name"] == name).map(|m| {
        (m["mountPath"].as_str().unwrap_or_default(), m["readOnly"].as_bool().unwrap_or(false))
    })
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("pod has no volume {name}: {pod}"))
}

/// The invariants every variant must keep; returns the workers' cluster config.
fn check_common(r: &Rendered) -> ClusterConfig {
    let v = &r.values;
    let cfg = r.cluster_config("ConfigMap", "fathom-config");

    // World size is the worker StatefulSet's replicas (one pod per GPU); tp follows the values.
    let sts = r.get("StatefulSet", "fathom-worker");
    let replicas = as_usize(&sts["spec"]["replicas"]);
    assert_eq!(cfg.parallel.world_size, replicas, "{}: world_size vs worker replicas", r.variant);
    assert_eq!(replicas, as_usize(&v["workers"]["replicas"]), "{}", r.variant);
    assert_eq!(cfg.parallel.tp, as_usize(&v["parallel"]["tp"]), "{}: tp", r.variant);
    assert_eq!(
        cfg.parallel.redundant_slots_per_rank,
        as_usize(&v["parallel"]["redundantSlotsPerRank"]),
        "{}",
        r.variant
    );
    let pinned = v["parallel"]["pinnedReplicas"].as_object().cloned().unwrap_or_default();
    assert_eq!(cfg.parallel.pinned_replicas.len(), pinned.len(), "{}", r.variant);
    for (k, n) in &pinned {
        assert_eq!(cfg.parallel.pinned_replicas.get(k), Some(&as_usize(n)), "{}: {k}", r.variant);
    }
    assert_eq!(cfg.cluster, v["clusterName"].as_str().unwrap(), "{}", r.variant);

    // etcd: the external endpoints verbatim, or the in-chart client Service.
    let external = strings(&v["etcd"]["external"]["endpoints"]);
    if external.is_empty() {
        let svc = r.get("Service", "fathom-etcd");
        let port = as_usize(&svc["spec"]["ports"][0]["port"]);
        assert_eq!(
            cfg.membership.etcd_endpoints,
            vec![format!("http://fathom-etcd.{NAMESPACE}.svc:{port}")],
            "{}",
            r.variant
        );
        let etcd = r.get("StatefulSet", "fathom-etcd");
        let members = as_usize(&etcd["spec"]["replicas"]);
        assert_eq!(members, as_usize(&v["etcd"]["replicas"]));
        let args = strings(&r.container("StatefulSet", "fathom-etcd", "etcd")["args"]);
        let initial = args
            .iter()
            .find_map(|a| a.strip_prefix("--initial-cluster="))
            .unwrap_or_else(|| panic!("{}: etcd has no --initial-cluster: {args:?}", r.variant));
        let names: Vec<&str> =
            initial.split(',').map(|m| m.split('=').next().unwrap_or_default()).collect();
        let expected: Vec<String> = (0..members).map(|i| format!("fathom-etcd-{i}")).collect();
        assert_eq!(names, expected, "{}: initial cluster {initial}", r.variant);
        for (i, member) in initial.split(',').enumerate() {
            let url = format!(
                "http://fathom-etcd-{i}.fathom-etcd-headless.{NAMESPACE}.svc.cluster.local:2380"
            );
            assert!(member.ends_with(&url), "{}: member {member} vs {url}", r.variant);
        }
        assert!(args.contains(&"--name=$(POD_NAME)".to_string()), "{args:?}");
        assert!(args.contains(&"--initial-cluster-state=new".to_string()), "{args:?}");
        let headless = r.get("Service", "fathom-etcd-headless");
        assert_eq!(headless["spec"]["clusterIP"], "None");
        assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    } else {
        assert_eq!(cfg.membership.etcd_endpoints, external, "{}", r.variant);
        assert!(r.find("StatefulSet", "fathom-etcd").is_none(), "{}: etcd deployed", r.variant);
        assert!(r.find("Service", "fathom-etcd").is_none(), "{}", r.variant);
    }

    // The coordinator: its Service is the advertised address, readiness is gRPC health.
    let coord_port = as_usize(&v["coordinator"]["grpcPort"]);
    assert_eq!(
        cfg.coordinator.advertise.as_deref(),
        Some(format!("fathom-coordinator.{NAMESPACE}.svc:{coord_port}").as_str()),
        "{}",
        r.variant
    );
    assert_eq!(cfg.coordinator.listen, format!("0.0.0.0:{coord_port}"));
    let svc = r.get("Service", "fathom-coordinator");
    let svc_ports: Vec<(&str, usize)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), as_usize(&p["port"])))
        .collect();
    assert!(svc_ports.contains(&("grpc", coord_port)), "{svc_ports:?}");
    assert!(svc_ports.iter().any(|(n, _)| *n == "metrics"), "{svc_ports:?}");
    let coord = r.container("Deployment", "fathom-coordinator", "coordinator");
    assert_eq!(
        strings(&coord["command"])[..4],
        ["fathom", "coordinator", "--config", "/etc/fathom/cluster.toml"]
    );
    assert_eq!(as_usize(&coord["readinessProbe"]["grpc"]["port"]), coord_port, "{}", r.variant);
    assert_eq!(mount(coord, "config"), Some(("/etc/fathom", true)));

    // Workers: the documented command, the id from the pod name, the model read-only, /dev/shm.
    let worker = r.container("StatefulSet", "fathom-worker", "worker");
    let cmd = strings(&worker["command"]);
    assert_eq!(
        cmd[..6],
        ["fathom", "worker", "--config", "/etc/fathom/cluster.toml", "--id", "$(POD_NAME)"],
        "{}",
        r.variant
    );
    let env = worker["env"].as_array().unwrap();
    let pod_name = env.iter().find(|e| e["name"] == "POD_NAME").expect("POD_NAME env");
    assert_eq!(pod_name["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    let model_mount = mount(worker, "model").expect("model mounted on workers");
    assert!(model_mount.1, "{}: model volume must be read-only", r.variant);
    assert!(
        cfg.model.path.starts_with(model_mount.0),
        "{}: model.path {} outside the mount {}",
        r.variant,
        cfg.model.path.display(),
        model_mount.0
    );
    let pod = r.pod_spec("StatefulSet", "fathom-worker");
    assert_eq!(mount(worker, "dshm"), Some(("/dev/shm", false)));
    assert_eq!(volume(pod, "dshm")["emptyDir"]["medium"], "Memory");
    let worker_port = as_usize(&v["workers"]["grpcPort"]);
    assert_eq!(cfg.worker.listen, format!("0.0.0.0:{worker_port}"));
    assert_eq!(as_usize(&worker["readinessProbe"]["grpc"]["port"]), worker_port);
    assert_eq!(cfg.worker.device, v["workers"]["device"].as_str().unwrap());
    assert_eq!(cfg.worker.comm, v["workers"]["comm"].as_str().unwrap());

    // Non-root, read-only root filesystem, no capabilities, on every container.
    for m in r.of_kind("Deployment").into_iter().chain(r.of_kind("StatefulSet")) {
        let spec = &m["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{}", m["metadata"]["name"]);
        let all = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(spec["initContainers"].as_array().map(|a| a.iter()).into_iter().flatten());
        for c in all {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", c["name"]);
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", c["name"]);
            assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{}", c["name"]);
        }
    }

    assert!(r.notes.contains("fathom generate --endpoint"), "{}: NOTES: {}", r.variant, r.notes);
    assert!(r.notes.contains("fathom.v1.Inference/Generate"), "{}", r.variant);
    cfg
}

fn gpu_limit(r: &Rendered) -> Option<u64> {
    r.container("StatefulSet", "fathom-worker", "worker")["resources"]["limits"]["nvidia.com/gpu"]
        .as_u64()
}

#[test]
fn helm_default_values() {
    let r = render("default");
    let cfg = check_common(&r);
    assert_eq!((cfg.parallel.world_size, cfg.parallel.tp), (8, 8));
    assert_eq!((cfg.worker.device.as_str(), cfg.worker.comm.as_str()), ("cuda", "nccl"));
    assert_eq!(gpu_limit(&r), Some(1), "one GPU per worker pod");
    let env = &r.container("StatefulSet", "fathom-worker", "worker")["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NCCL_NVLS_ENABLE" && e["value"] == "0"),
        "NVLink multicast must stay off: {env}"
    );
    assert_eq!(r.get("StatefulSet", "fathom-etcd")["spec"]["replicas"], 1);
    assert_eq!(r.of_kind("PodDisruptionBudget").len(), 3);
    assert!(r.of_kind("ServiceMonitor").is_empty(), "ServiceMonitor is off by default");
    assert_eq!(cfg.model.path, Path::new("/models/DeepSeek-V3.2"));
    assert!(cfg.coordinator.admin_token.is_none());
}

#[test]
fn helm_external_etcd_variant() {
    let r = render("external-etcd");
    let cfg = check_common(&r);
    assert_eq!(
        cfg.membership.etcd_endpoints,
        [
            "http://etcd-0.etcd.infra.svc:2379",
            "http://etcd-1.etcd.infra.svc:2379",
            "http://etcd-2.etcd.infra.svc:2379"
        ]
    );
    assert_eq!((cfg.parallel.world_size, cfg.parallel.tp), (8, 4));
    assert_eq!(cfg.parallel.redundant_slots_per_rank, 2);
    assert_eq!(cfg.parallel.pinned_replicas.get("3:17"), Some(&2));
    assert_eq!(cfg.parallel.pinned_replicas.get("*:5"), Some(&3));
    assert_eq!(cfg.cluster, "prod-a");
    assert_eq!(cfg.coordinator.http_listen, "0.0.0.0:8080");
    // The admin token stays out of the shared ConfigMap; the coordinator reads a Secret.
    assert!(cfg.coordinator.admin_token.is_none());
    let coord_cfg = r.cluster_config("Secret", "fathom-coordinator-config");
    assert_eq!(coord_cfg.coordinator.admin_token.as_deref(), Some("ci-not-a-secret"));
    let mut without_token = coord_cfg.clone();
    without_token.coordinator.admin_token = None;
    assert_eq!(without_token, cfg, "the coordinator's config differs only by admin_token");
    let holders: Vec<_> = r
        .manifests
        .iter()
        .filter(|m| m.to_string().contains("ci-not-a-secret"))
        .map(|m| format!("{}/{}", m["kind"], m["metadata"]["name"]))
        .collect();
    assert_eq!(holders, [r#""Secret"/"fathom-coordinator-config""#], "the token leaks");
    let pod = r.pod_spec("Deployment", "fathom-coordinator");
    assert_eq!(volume(pod, "config")["secret"]["secretName"], "fathom-coordinator-config");
    let worker_pod = r.pod_spec("StatefulSet", "fathom-worker");
    assert_eq!(volume(worker_pod, "model")["hostPath"]["path"], "/mnt/nvme/models");
    assert_eq!(cfg.model.path, Path::new("/models/DeepSeek-V3.2-FP8"));
}

#[test]
fn helm_16_gpu_workers_tp8_variant() {
    let r = render("gpu-16x-tp8");
    let cfg = check_common(&r);
    assert_eq!((cfg.parallel.world_size, cfg.parallel.tp), (16, 8));
    assert_eq!(gpu_limit(&r), Some(1));
    assert_eq!(r.get("StatefulSet", "fathom-etcd")["spec"]["replicas"], 3);
    // Quorum of 3 survives one member away.
    assert_eq!(r.get("PodDisruptionBudget", "fathom-etcd")["spec"]["maxUnavailable"], 1);
    let monitors = r.of_kind("ServiceMonitor");
    assert_eq!(monitors.len(), 2, "coordinator and worker ServiceMonitors");
    for m in monitors {
        assert_eq!(m["metadata"]["labels"]["release"], "kube-prometheus-stack");
        assert_eq!(m["spec"]["endpoints"][0]["port"], "metrics");
    }
    let pod = r.pod_spec("StatefulSet", "fathom-worker");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.product"], "NVIDIA-H200");
    let limits = &r.container("StatefulSet", "fathom-worker", "worker")["resources"]["limits"];
    assert_eq!(limits["rdma/ib"], 1, "{limits}");
}

#[test]
fn helm_cpu_dev_variant() {
    let r = render("cpu-dev");
    let cfg = check_common(&r);
    assert_eq!((cfg.parallel.world_size, cfg.parallel.tp), (2, 2));
    assert_eq!((cfg.worker.device.as_str(), cfg.worker.comm.as_str()), ("cpu", "tcp"));
    // No GPU requested anywhere, no GPU toleration.
    for m in &r.manifests {
        let text = m.to_string();
        assert!(!text.contains("nvidia.com/gpu"), "{}: GPU in {text}", m["metadata"]["name"]);
    }
    // The synthetic checkpoint is written by an init container into the model volume, at the
    // path cluster.toml names, with the same seed everywhere.
    let pod = r.pod_spec("StatefulSet", "fathom-worker");
    let init = &pod["initContainers"][0];
    let cmd = strings(&init["command"]);
    assert_eq!(cmd[..3], ["fathom", "checkpoint", "synth"], "{cmd:?}");
    let out = cmd.iter().position(|a| a == "--out").map(|i| cmd[i + 1].clone());
    assert_eq!(out.as_deref().map(Path::new), Some(cfg.model.path.as_path()));
    assert!(cmd.windows(2).any(|w| w == ["--seed", "7"]), "{cmd:?}");
    assert!(volume(pod, "model")["emptyDir"].is_object());
    assert!(r.of_kind("PodDisruptionBudget").is_empty());
    assert!(r.get("StatefulSet", "fathom-etcd")["spec"]["volumeClaimTemplates"].is_null());
}

#[test]
fn helm_rejects_inconsistent_values() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        ("workers:\n  replicas: 6\nparallel:\n  tp: 4\n", "parallel.tp (4) must divide"),
        ("workers:\n  gpu:\n    enabled: false\n  device: cpu\n  comm: nccl\n", "workers.comm=tcp"),
        ("etcd:\n  replicas: 2\n", "etcd.replicas must be 1, 3 or 5"),
        ("workers:\n  device: tpu\n", "workers.device must be cpu, cuda or cuda:N"),
    ];
    for (i, (values, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, values)?;
        match try_render(path.to_str().unwrap()) {
            Ok(_) => bail!("values {values:?} rendered; expected an error naming {want:?}"),
            Err(e) => ensure!(format!("{e:#}").contains(want), "{values:?}: {e:#}"),
        }
    }
    Ok(())
}
