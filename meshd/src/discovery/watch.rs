//! `meshd discover` against the API server: one kube-rs watcher per kind
//! (its default backoff on errors, a relist when a watch expires) feeding
//! one loop that applies the changes to a `Cluster` and, once every kind
//! has been listed and the changes settle, rewrites the files when their
//! bytes change. A thin shell around `Cluster::change` and `translate`,
//! which are pure and tested with watcher events.
//!
//! Pods are watched mesh-wide, not only this node's: an endpoint on
//! another node needs its pod's service account (the identity its tunnel
//! must prove) and labels (route subsets), which no EndpointSlice carries.
//! Each pod is held as the few fields meshd needs (`PodInfo`), never as
//! the object. With the API server gone, the last files keep serving.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::{watcher, WatchStreamExt as _},
    Client,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{
    cluster::{Change, Cluster, Key, Kind, Object},
    report::{Addresses, Report, Written},
    translate::{translate, Settings, Translation},
};

/// The custom resources read: kind, group, version, plural.
const CUSTOM: &[(Kind, &str, &str, &str)] = &[
    (
        Kind::HttpRoute,
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
    ),
    (
        Kind::DestinationRule,
        "networking.istio.io",
        "v1",
        "destinationrules",
    ),
    (
        Kind::PeerAuthentication,
        "security.istio.io",
        "v1",
        "peerauthentications",
    ),
    (
        Kind::AuthorizationPolicy,
        "security.istio.io",
        "v1",
        "authorizationpolicies",
    ),
];

/// Every kind watched; the first files wait until each has been listed.
pub const KINDS: usize = 4 + CUSTOM.len();

/// How long changes may keep arriving before the files are rewritten (a
/// relist is many events; one rewrite for all of them).
const SETTLE: Duration = Duration::from_millis(200);

/// How often a custom resource that is not installed is looked for again.
const ABSENT_RETRY: Duration = Duration::from_secs(60);

/// What a watcher task reports.
#[derive(Debug)]
pub enum Update {
    Change(Change),
    /// An object that could not be read: until it is readable or gone, no
    /// files are written (leaving it out could widen access).
    Unreadable(Kind, Key, String),
    /// The kind's API is not served (its CRD is not installed): it has no
    /// objects.
    Absent(Kind),
    Error(Kind, String),
}

/// A kube-rs watcher event as a `Change`; `object` types what arrived.
pub fn change_of<K>(
    kind: Kind,
    event: watcher::Event<K>,
    object: impl Fn(K) -> Result<Object, (Key, String)>,
) -> Update {
    let typed = |k| match object(k) {
        Ok(object) => Ok(object),
        Err((key, message)) => Err(Update::Unreadable(kind, key, message)),
    };
    let result = match event {
        watcher::Event::Apply(k) => typed(k).map(Change::Apply),
        watcher::Event::InitApply(k) => typed(k).map(Change::InitApply),
        watcher::Event::Delete(k) => match object(k) {
            Ok(object) => Ok(Change::Delete(kind, object.key())),
            Err((key, _)) => Ok(Change::Delete(kind, key)),
        },
        watcher::Event::Init => Ok(Change::Init(kind)),
        watcher::Event::InitDone => Ok(Change::InitDone(kind)),
    };
    result.map_or_else(|update| update, Update::Change)
}

/// A custom resource as the `Object` of its kind.
pub fn custom_object(object: DynamicObject) -> Result<Object, (Key, String)> {
    let key = (
        object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        object.metadata.name.clone().unwrap_or_default(),
    );
    let value = serde_yaml::to_value(&object).map_err(|e| (key.clone(), e.to_string()))?;
    match Object::from_value(value) {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err((key, "not a kind discovery reads".into())),
        Err(err) => Err((key, err.message)),
    }
}

fn typed<K>(api: Api<K>, kind: Kind, object: fn(K) -> Object, updates: mpsc::Sender<Update>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(forward(api, kind, move |k| Ok(object(k)), updates));
}

/// Sends a watch's events as updates until the loop is gone (`false`) or
/// the watch ends (`true`).
async fn forward<K>(
    api: Api<K>,
    kind: Kind,
    object: impl Fn(K) -> Result<Object, (Key, String)>,
    updates: mpsc::Sender<Update>,
) -> bool
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(event) => change_of(kind, event, &object),
            Err(err) => Update::Error(kind, err.to_string()),
        };
        if updates.send(update).await.is_err() {
            return false;
        }
    }
    true
}

fn custom(
    client: Client,
    kind: Kind,
    group: &str,
    version: &str,
    plural: &str,
    updates: mpsc::Sender<Update>,
) {
    let gvk = GroupVersionKind::gvk(group, version, kind.as_str());
    let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
    tokio::spawn(async move {
        loop {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            match api.list(&ListParams::default().limit(1)).await {
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    if updates.send(Update::Absent(kind)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(ABSENT_RETRY).await;
                    continue;
                }
                Err(err) => {
                    if updates
                        .send(Update::Error(kind, err.to_string()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
                Ok(_) => {}
            }
            if !forward(api, kind, custom_object, updates.clone()).await {
                return;
            }
        }
    });
}

/// What the loop knows beyond the objects: which kinds have been listed
/// and which objects could not be read.
#[derive(Default)]
pub struct Watched {
    pub cluster: Cluster,
    pub listed: BTreeSet<Kind>,
    pub unreadable: BTreeMap<(Kind, Key), String>,
}

impl Watched {
    pub fn update(&mut self, update: Update) {
        match update {
            Update::Change(change) => {
                match &change {
                    Change::InitDone(kind) => {
                        self.listed.insert(*kind);
                    }
                    Change::Apply(object) | Change::InitApply(object) => {
                        self.unreadable.remove(&(object.kind(), object.key()));
                    }
                    Change::Delete(kind, key) => {
                        self.unreadable.remove(&(*kind, key.clone()));
                    }
                    Change::Init(_) => {}
                }
                self.cluster.change(change);
            }
            Update::Unreadable(kind, key, message) => {
                error!(kind = kind.as_str(), object = %format!("{}/{}", key.0, key.1), %message, "cannot read an object; no files are written until it is readable or gone");
                self.unreadable.insert((kind, key), message);
            }
            Update::Absent(kind) => {
                if self.listed.insert(kind) {
                    info!(
                        kind = kind.as_str(),
                        "not served by the API server (its CRD is not installed): none"
                    );
                }
                self.cluster.change(Change::Init(kind));
                self.cluster.change(Change::InitDone(kind));
            }
            Update::Error(kind, message) => {
                warn!(kind = kind.as_str(), %message, "watch failed; retrying with backoff, the files keep serving");
            }
        }
    }

    /// The translation to write now: every kind listed, nothing unreadable.
    pub fn ready(&self) -> bool {
        self.listed.len() == KINDS && self.unreadable.is_empty()
    }
}

/// Watches the API server and keeps the files in `out` current, until the
/// process is stopped.
pub async fn run(settings: Settings, out: PathBuf, addresses: Addresses) -> anyhow::Result<()> {
    let report = Arc::new(Report::new(&settings.node, &out.join(super::CONFIG_FILE)));
    super::report::serve(report.clone(), addresses).await?;
    let client = Client::try_default().await.context(
        "no Kubernetes API config (an in-cluster service account token or a kubeconfig)",
    )?;
    let (updates, mut received) = mpsc::channel(4096);
    typed::<Service>(
        Api::all(client.clone()),
        Kind::Service,
        |o| Object::Service(Box::new(o)),
        updates.clone(),
    );
    typed::<EndpointSlice>(
        Api::all(client.clone()),
        Kind::EndpointSlice,
        |o| Object::EndpointSlice(Box::new(o)),
        updates.clone(),
    );
    typed::<Pod>(
        Api::all(client.clone()),
        Kind::Pod,
        |o| Object::Pod(Box::new(o)),
        updates.clone(),
    );
    typed::<Node>(
        Api::all(client.clone()),
        Kind::Node,
        |o| Object::Node(Box::new(o)),
        updates.clone(),
    );
    for (kind, group, version, plural) in CUSTOM {
        custom(
            client.clone(),
            *kind,
            group,
            version,
            plural,
            updates.clone(),
        );
    }
    drop(updates);
    let mut watched = Watched::default();
    let mut written: Option<Translation> = None;
    let take = |watched: &mut Watched, update: Update| {
        report.observed(&update, SystemTime::now());
        watched.update(update);
        report.held(watched);
    };
    while let Some(update) = received.recv().await {
        take(&mut watched, update);
        let settle = tokio::time::Instant::now() + SETTLE;
        while let Ok(Some(update)) = tokio::time::timeout_at(settle, received.recv()).await {
            take(&mut watched, update);
        }
        if !watched.ready() {
            continue;
        }
        let translation = translate(&watched.cluster, &settings);
        if written.as_ref() == Some(&translation) {
            report.wrote(Written::Unchanged, SystemTime::now());
            continue;
        }
        super::log_unsupported(&report.translated(&translation.unsupported));
        let result = write(&translation, &settings, &out);
        report.wrote(result, SystemTime::now());
        if matches!(result, Written::Written | Written::Unchanged) {
            written = Some(translation);
        }
    }
    anyhow::bail!("every watch ended")
}

/// Validates a translation with meshd's own rules and writes it.
fn write(translation: &Translation, settings: &Settings, out: &Path) -> Written {
    if let Err(errors) = super::load(translation, &settings.node, settings.node_config.is_some()) {
        error!(%errors, "the translation is no config meshd accepts (a discovery bug); the last files keep serving");
        return Written::Refused;
    }
    match super::write_files(out, translation) {
        Ok(true) => {
            info!(out = %out.display(), "files written");
            Written::Written
        }
        Ok(false) => Written::Unchanged,
        Err(err) => {
            error!(error = %err, out = %out.display(), "cannot write the files; the last ones keep serving");
            Written::Failed
        }
    }
}
