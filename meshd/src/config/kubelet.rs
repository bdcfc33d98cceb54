//! Where the kubelet puts a pod's cgroup, from its UID and QoS class, for
//! both cgroup drivers. Pure: the driver is given (or guessed from the pod
//! subtree's name); detecting it from the node's tree is the host's job.
//!
//! | QoS | `systemd` (below `kubepods.slice`) | `cgroupfs` (below `kubepods`) |
//! |---|---|---|
//! | Guaranteed | `kubepods-pod<uid_>.slice` | `pod<uid>` |
//! | Burstable | `kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | `burstable/pod<uid>` |
//! | BestEffort | `kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` | `besteffort/pod<uid>` |
//!
//! (`uid_`: the UID with `-` written `_`, systemd's escaping.) The pod's
//! containers run in child cgroups of these (`cri-containerd-<id>.scope`,
//! `crio-<id>.scope`, `docker-<id>.scope`, or `<id>` with cgroupfs).

use serde::Deserialize;

/// `node.cgroupDriver`: the kubelet's `cgroupDriver`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriverSpec {
    /// Detected from the node's cgroup tree when meshd starts.
    #[default]
    Auto,
    Systemd,
    Cgroupfs,
}

impl CgroupDriverSpec {
    /// The driver, unless it is left to detection.
    pub fn decided(self) -> Option<CgroupDriver> {
        match self {
            Self::Auto => None,
            Self::Systemd => Some(CgroupDriver::Systemd),
            Self::Cgroupfs => Some(CgroupDriver::Cgroupfs),
        }
    }
}

/// A cgroup driver, decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    /// The driver a pod subtree's own name implies: systemd's cgroups are
    /// slices (`/kubepods.slice`), cgroupfs's plain directories.
    pub fn guess(pod_cgroup: &str) -> Self {
        if pod_cgroup.trim_end_matches('/').ends_with(".slice") {
            Self::Systemd
        } else {
            Self::Cgroupfs
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Systemd => "systemd",
            Self::Cgroupfs => "cgroupfs",
        }
    }
}

/// Whether a cgroup named `name` is one of the kubelet's QoS cgroups (or
/// its pods' root), which hold many pods: never one workload's.
pub fn is_qos_cgroup(name: &str) -> bool {
    matches!(
        name,
        "kubepods"
            | "kubepods.slice"
            | "burstable"
            | "besteffort"
            | "kubepods-burstable.slice"
            | "kubepods-besteffort.slice"
    )
}

/// A pod's `status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// A workload's `pod`: the kubelet's pod, whose cgroup meshd computes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodRef {
    /// `metadata.uid`.
    pub uid: String,
    /// `status.qosClass`.
    pub qos_class: QosClass,
}

impl PodRef {
    /// Whether the UID can only name one directory: letters, digits and
    /// `-`, as Kubernetes writes UIDs (never `/`, `.` or anything a path
    /// could be steered with).
    pub fn uid_is_valid(&self) -> bool {
        !self.uid.is_empty()
            && self.uid.len() <= 64
            && self
                .uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    }

    /// The pod's cgroup below `pod_cgroup` (the kubelet's `kubepods`
    /// cgroup) with `driver`.
    pub fn cgroup(&self, pod_cgroup: &str, driver: CgroupDriver) -> String {
        let root = pod_cgroup.trim_end_matches('/');
        match driver {
            CgroupDriver::Systemd => {
                // Systemd names a slice by its whole ancestry: below
                // `kubepods.slice`, `kubepods-burstable.slice`, and so on.
                let base = root
                    .rsplit('/')
                    .next()
                    .and_then(|name| name.strip_suffix(".slice"))
                    .filter(|name| !name.is_empty())
                    .unwrap_or("kubepods");
                let uid = self.uid.replace('-', "_");
                match self.qos_class {
                    QosClass::Guaranteed => format!("{root}/{base}-pod{uid}.slice"),
                    QosClass::Burstable => {
                        format!("{root}/{base}-burstable.slice/{base}-burstable-pod{uid}.slice")
                    }
                    QosClass::BestEffort => {
                        format!("{root}/{base}-besteffort.slice/{base}-besteffort-pod{uid}.slice")
                    }
                }
            }
            CgroupDriver::Cgroupfs => match self.qos_class {
                QosClass::Guaranteed => format!("{root}/pod{}", self.uid),
                QosClass::Burstable => format!("{root}/burstable/pod{}", self.uid),
                QosClass::BestEffort => format!("{root}/besteffort/pod{}", self.uid),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8f2b4c1e-5d3a-4b7e-9c0f-1a2b3c4d5e6f";

    fn pod(qos_class: QosClass) -> PodRef {
        PodRef {
            uid: UID.to_owned(),
            qos_class,
        }
    }

    #[test]
    fn systemd_layout_is_the_kubelets() {
        let at = |qos| pod(qos).cgroup("/kubepods.slice", CgroupDriver::Systemd);
        assert_eq!(
            at(QosClass::Guaranteed),
            "/kubepods.slice/kubepods-pod8f2b4c1e_5d3a_4b7e_9c0f_1a2b3c4d5e6f.slice"
        );
        assert_eq!(
            at(QosClass::Burstable),
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8f2b4c1e_5d3a_4b7e_9c0f_1a2b3c4d5e6f.slice"
        );
        assert_eq!(
            at(QosClass::BestEffort),
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8f2b4c1e_5d3a_4b7e_9c0f_1a2b3c4d5e6f.slice"
        );
    }

    #[test]
    fn cgroupfs_layout_is_the_kubelets() {
        let at = |qos| pod(qos).cgroup("/kubepods/", CgroupDriver::Cgroupfs);
        assert_eq!(at(QosClass::Guaranteed), format!("/kubepods/pod{UID}"));
        assert_eq!(
            at(QosClass::Burstable),
            format!("/kubepods/burstable/pod{UID}")
        );
        assert_eq!(
            at(QosClass::BestEffort),
            format!("/kubepods/besteffort/pod{UID}")
        );
    }

    #[test]
    fn a_nested_pod_subtree_keeps_the_slice_naming() {
        // A test bed or a kubelet with a cgroup root below `/`.
        let path =
            pod(QosClass::Burstable).cgroup("/t/node-a/kubepods.slice", CgroupDriver::Systemd);
        assert!(path.starts_with(
            "/t/node-a/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        ));
    }

    #[test]
    fn the_driver_is_guessed_from_the_subtree_name() {
        assert_eq!(
            CgroupDriver::guess("/kubepods.slice"),
            CgroupDriver::Systemd
        );
        assert_eq!(CgroupDriver::guess("/kubepods"), CgroupDriver::Cgroupfs);
    }

    #[test]
    fn uids_that_could_steer_a_path_are_refused() {
        for bad in ["", "../x", "a/b", "a.b", "pod\0", &"a".repeat(65)] {
            let pod = PodRef {
                uid: bad.to_owned(),
                qos_class: QosClass::Guaranteed,
            };
            assert!(!pod.uid_is_valid(), "{bad:?}");
        }
        assert!(pod(QosClass::Guaranteed).uid_is_valid());
    }
}
