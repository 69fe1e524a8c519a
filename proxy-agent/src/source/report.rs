//! One sink for configuration problems: broken manifest files, invalid objects from the API
//! server, route policies that cannot apply. Every problem is logged once when it appears (and
//! once when it is resolved), becomes a Kubernetes Event on the object (with its uid) when the
//! API server is the source, and is listed by the admin API's `/problems` until it goes away.
//!
//! Problems are kept by scope (a file, an object, the route table): whoever finds problems
//! replaces the whole set of its scope, so a fixed object clears its entry and nothing stays
//! behind from delete events that were missed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::ObjectReference;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::model::ObjectRef;

/// A configuration problem, precise enough for an operator to fix it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    /// Kind of the object (`Service`, `VirtualService`...), or `File` for an unreadable file.
    pub kind: String,
    /// `namespace/name` of the object (`-` when it could not be identified).
    pub object: String,
    /// The manifest file, when the manifests directory is the source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Path of the offending field (`spec.ports[0].port`), `-` for the whole object.
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
    /// What serves meanwhile (`the last good version keeps serving`).
    pub effect: String,
    /// The object in the API server (for Events), when known.
    #[serde(skip)]
    pub reference: Option<ObjectReference>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        write!(
            f,
            "{} {}: field `{}`: {}; {}",
            self.kind, self.object, self.field, self.message, self.effect
        )
    }
}

/// A problem as listed by `/problems`.
#[derive(Clone, Debug, Serialize)]
pub struct Listed {
    /// Who found it (`file:PATH`, `object:Kind/ns/name`, `routes`, ...).
    pub scope: String,
    /// The problem.
    #[serde(flatten)]
    pub problem: Problem,
    /// When it was first reported (seconds since the Unix epoch).
    pub since_unix: u64,
}

#[derive(Default)]
struct Inner {
    scopes: BTreeMap<String, Vec<(Problem, SystemTime)>>,
    events: Option<mpsc::UnboundedSender<Problem>>,
    /// API server references of objects that route problems may name (Istio kinds).
    references: HashMap<(String, ObjectRef), ObjectReference>,
}

/// The problem sink, shared by the sources, the agent and the admin API.
#[derive(Clone, Default)]
pub struct Reporter(Arc<Mutex<Inner>>);

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reporter({} problems)", self.count())
    }
}

impl Reporter {
    /// An empty reporter that only logs and lists.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends every new problem from now on to `tx` (the API server source publishes them as
    /// Events).
    pub fn send_events_to(&self, tx: mpsc::UnboundedSender<Problem>) {
        self.lock().events = Some(tx);
    }

    /// Remembers the API server reference of an object, so problems found later on it (by
    /// the route builder) become Events on the right object.
    pub fn remember(&self, kind: &str, id: &ObjectRef, reference: ObjectReference) {
        self.lock()
            .references
            .insert((kind.to_string(), id.clone()), reference);
    }

    /// Forgets a reference remembered with [`Reporter::remember`].
    pub fn forget(&self, kind: &str, id: &ObjectRef) {
        self.lock()
            .references
            .remove(&(kind.to_string(), id.clone()));
    }

    /// Replaces the problems of `scope` with `problems`: new ones are logged and sent as
    /// Events, the ones that disappeared are logged as resolved.
    pub fn replace(&self, scope: &str, problems: Vec<Problem>) {
        let mut inner = self.lock();
        let old = inner.scopes.remove(scope).unwrap_or_default();
        let now = SystemTime::now();
        let mut next = Vec::with_capacity(problems.len());
        for mut p in problems {
            if let Some((_, since)) = old.iter().find(|(o, _)| same(o, &p)) {
                next.push((p, *since));
                continue;
            }
            error!(
                scope,
                kind = %p.kind,
                object = %p.object,
                file = p.file.as_deref().unwrap_or("-"),
                field = %p.field,
                "{}; {}",
                p.message,
                p.effect
            );
            if p.reference.is_none() {
                p.reference = inner
                    .references
                    .get(&(p.kind.clone(), parse_ref(&p.object)))
                    .cloned();
            }
            if let Some(tx) = &inner.events
                && p.reference.is_some()
            {
                let _ = tx.send(p.clone());
            }
            next.push((p, now));
        }
        for (o, _) in &old {
            if !next.iter().any(|(n, _)| same(o, n)) {
                info!(scope, kind = %o.kind, object = %o.object, field = %o.field, "configuration problem resolved");
            }
        }
        if !next.is_empty() {
            inner.scopes.insert(scope.to_string(), next);
        }
    }

    /// Clears the problems of every scope starting with `prefix` that `keep` rejects.
    pub fn retain_scopes(&self, prefix: &str, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .lock()
            .scopes
            .keys()
            .filter(|s| s.starts_with(prefix) && !keep(s))
            .cloned()
            .collect();
        for s in gone {
            self.replace(&s, Vec::new());
        }
    }

    /// Every current problem, by scope.
    pub fn list(&self) -> Vec<Listed> {
        self.lock()
            .scopes
            .iter()
            .flat_map(|(scope, ps)| {
                ps.iter().map(|(p, since)| Listed {
                    scope: scope.clone(),
                    problem: p.clone(),
                    since_unix: since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
            })
            .collect()
    }

    /// How many problems there are now.
    pub fn count(&self) -> usize {
        self.lock().scopes.values().map(Vec::len).sum()
    }
}

fn same(a: &Problem, b: &Problem) -> bool {
    a.kind == b.kind
        && a.object == b.object
        && a.file == b.file
        && a.field == b.field
        && a.message == b.message
}

fn parse_ref(object: &str) -> ObjectRef {
    match object.split_once('/') {
        Some((ns, name)) => ObjectRef::new(ns, name),
        None => ObjectRef::new("default", object),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(object: &str, message: &str) -> Problem {
        Problem {
            kind: "VirtualService".into(),
            object: object.into(),
            file: None,
            field: "spec.http[0]".into(),
            message: message.into(),
            effect: "the last good version keeps serving".into(),
            reference: None,
        }
    }

    #[test]
    fn scopes_are_replaced_and_events_sent_once_with_the_remembered_reference() {
        let r = Reporter::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.send_events_to(tx);
        let reference = ObjectReference {
            kind: Some("VirtualService".into()),
            name: Some("web".into()),
            namespace: Some("shop".into()),
            uid: Some("1234".into()),
            ..Default::default()
        };
        r.remember(
            "VirtualService",
            &ObjectRef::new("shop", "web"),
            reference.clone(),
        );
        r.replace("routes", vec![p("shop/web", "unknown subset")]);
        r.replace("routes", vec![p("shop/web", "unknown subset")]);
        assert_eq!(r.count(), 1);
        let ev = rx.try_recv().expect("one Event");
        assert_eq!(ev.reference.unwrap().uid.as_deref(), Some("1234"));
        assert!(
            rx.try_recv().is_err(),
            "an unchanged problem is not sent again"
        );
        r.replace("file:a.yaml", vec![p("default/x", "bad")]);
        assert_eq!(r.list().len(), 2);
        r.retain_scopes("file:", |_| false);
        r.replace("routes", vec![]);
        assert_eq!(r.count(), 0);
    }
}
