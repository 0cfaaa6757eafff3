//! The stand-in's state: the objects of each kind, one global
//! resourceVersion counter (as etcd's revision), and the history of changes
//! that watches replay and consistent list pages are served from.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::wire;

/// The resources the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Pod,
    Namespace,
    /// `v1` Event (`/api/v1/.../events`).
    Event,
    /// `events.k8s.io/v1` Event, stored apart from the core ones: the real
    /// server converts between the two, the stand-in does not.
    EventV1,
    /// `apps/v1` DaemonSet (read only through the API: the test sets it).
    DaemonSet,
}

impl Kind {
    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Kind::EventV1 => "events.k8s.io/v1",
            Kind::DaemonSet => "apps/v1",
            _ => "v1",
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Event | Kind::EventV1 => "Event",
            Kind::DaemonSet => "DaemonSet",
        }
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Event | Kind::EventV1 => "events",
            Kind::DaemonSet => "daemonsets",
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// The `group/resource` the real server names in its messages
    /// (`pods "x" not found`, `events.events.k8s.io "y" already exists`).
    pub(crate) fn resource_name(self) -> &'static str {
        match self {
            Kind::EventV1 => "events.events.k8s.io",
            Kind::DaemonSet => "daemonsets.apps",
            _ => self.plural(),
        }
    }

    pub(crate) fn group(self) -> &'static str {
        match self {
            Kind::EventV1 => "events.k8s.io",
            Kind::DaemonSet => "apps",
            _ => "",
        }
    }

    /// The empty object of this kind a BOOKMARK carries (the real server
    /// serialises an empty typed object: zero-valued fields included).
    pub(crate) fn bookmark(self, rv: u64, initial_events_end: bool) -> Value {
        let mut metadata = json!({
            "resourceVersion": rv.to_string(),
            "creationTimestamp": null,
        });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        let mut obj = json!({
            "kind": self.kind(),
            "apiVersion": self.api_version(),
            "metadata": metadata,
        });
        match self {
            Kind::Pod => {
                obj["spec"] = json!({ "containers": null });
                obj["status"] = json!({});
            }
            Kind::Namespace => {
                obj["spec"] = json!({});
                obj["status"] = json!({});
            }
            Kind::Event => obj["involvedObject"] = json!({}),
            Kind::EventV1 => obj["eventTime"] = Value::Null,
            Kind::DaemonSet => {
                obj["spec"] = json!({ "selector": null, "template": { "metadata": { "creationTimestamp": null }, "spec": { "containers": null } } });
                obj["status"] = json!({
                    "currentNumberScheduled": 0, "numberMisscheduled": 0,
                    "desiredNumberScheduled": 0, "numberReady": 0,
                });
            }
        }
        obj
    }
}

/// What a change did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change in the history.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: Kind,
    pub(crate) key: String,
    pub(crate) change: ChangeType,
    /// The object after the change; for a deletion its last state, carrying
    /// the deletion's resourceVersion (as the real watch cache sends it).
    pub(crate) object: Value,
    /// The object before the change (none for an addition).
    pub(crate) prev: Option<Value>,
}

/// A watch resuming, or a list page, at a resourceVersion the history no
/// longer reaches: the real server's `410 Expired`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expired {
    pub(crate) requested: u64,
    pub(crate) oldest: u64,
}

struct Entry {
    object: Value,
    /// resourceVersion of the object's creation: the order of `events()`.
    created: u64,
}

pub(crate) struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// The history holds every change with a resourceVersion above this.
    compacted: u64,
    /// Keyed by kind then `namespace/name` (or `name`): the string order is
    /// the order of the real server's etcd keys, hence of its lists.
    objects: BTreeMap<(Kind, String), Entry>,
    history: VecDeque<Change>,
}

/// The store key of an object.
pub(crate) fn key(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_owned()
    } else {
        format!("{namespace}/{name}")
    }
}

impl Store {
    pub(crate) fn new() -> Self {
        // Starts above 0: "0" means "any version" on the wire.
        Self {
            rv: 1,
            compacted: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
        }
    }

    pub(crate) fn rv(&self) -> u64 {
        self.rv
    }

    pub(crate) fn compacted(&self) -> u64 {
        self.compacted
    }

    pub(crate) fn get(&self, kind: Kind, key: &str) -> Option<&Value> {
        self.objects
            .get(&(kind, key.to_owned()))
            .map(|entry| &entry.object)
    }

    /// Creates or replaces `object` (which has its kind's `apiVersion`,
    /// `kind`, `metadata.name` and, if namespaced, `metadata.namespace`):
    /// assigns the next resourceVersion, keeps the `uid` and
    /// `creationTimestamp` of the object it replaces, assigns them if new.
    pub(crate) fn put(&mut self, kind: Kind, mut object: Value) -> (Value, ChangeType) {
        let meta = &object["metadata"];
        let key = key(
            meta["namespace"].as_str().unwrap_or(""),
            meta["name"].as_str().expect("object has metadata.name"),
        );
        self.rv += 1;
        let rv = self.rv;
        let map_key = (kind, key.clone());
        let prev = self.objects.get(&map_key).map(|e| e.object.clone());
        let meta = object["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        for field in ["uid", "creationTimestamp"] {
            let missing = meta.get(field).is_none_or(Value::is_null);
            if missing {
                let value = match prev.as_ref().map(|p| &p["metadata"][field]) {
                    Some(Value::String(s)) => Value::String(s.clone()),
                    _ if field == "uid" => Value::String(wire::uid()),
                    _ => Value::String(wire::now_rfc3339()),
                };
                meta.insert(field.to_owned(), value);
            }
        }
        meta.insert("resourceVersion".to_owned(), Value::String(rv.to_string()));
        let change = if prev.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        let created = self.objects.get(&map_key).map_or(rv, |e| e.created);
        self.objects.insert(
            map_key,
            Entry {
                object: object.clone(),
                created,
            },
        );
        self.history.push_back(Change {
            rv,
            kind,
            key,
            change,
            object: object.clone(),
            prev,
        });
        (object, change)
    }

    /// Deletes an object; returns its last state with the deletion's
    /// resourceVersion, as the DELETED watch event carries it.
    pub(crate) fn remove(&mut self, kind: Kind, key: &str) -> Option<Value> {
        let entry = self.objects.remove(&(kind, key.to_owned()))?;
        self.rv += 1;
        let mut last = entry.object.clone();
        last["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        self.history.push_back(Change {
            rv: self.rv,
            kind,
            key: key.to_owned(),
            change: ChangeType::Deleted,
            object: last.clone(),
            prev: Some(entry.object),
        });
        Some(last)
    }

    /// Forgets the history: a watch or list page from before now is
    /// answered `410 Expired`.
    pub(crate) fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// The objects of `kind`, ordered by key, as they were at `at` (now if
    /// `None`): the current state with every later change undone.
    pub(crate) fn snapshot(
        &self,
        kind: Kind,
        at: Option<u64>,
    ) -> Result<Vec<(String, Value)>, Expired> {
        let mut objects: BTreeMap<String, Value> = self
            .objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, key), entry)| (key.clone(), entry.object.clone()))
            .collect();
        if let Some(at) = at.filter(|at| *at < self.rv) {
            if at < self.compacted {
                return Err(Expired {
                    requested: at,
                    oldest: self.compacted,
                });
            }
            for change in self.history.iter().rev() {
                if change.rv <= at {
                    break;
                }
                if change.kind != kind {
                    continue;
                }
                match &change.prev {
                    Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                    None => objects.remove(&change.key),
                };
            }
        }
        Ok(objects.into_iter().collect())
    }

    /// The changes to `kind` after resourceVersion `after`.
    pub(crate) fn changes_since(&self, kind: Kind, after: u64) -> Result<Vec<Change>, Expired> {
        if after < self.compacted {
            return Err(Expired {
                requested: after,
                oldest: self.compacted,
            });
        }
        // The history is ordered: skip from the back to the first change
        // after `after`.
        let newer = self
            .history
            .iter()
            .rev()
            .take_while(|c| c.rv > after)
            .count();
        Ok(self
            .history
            .iter()
            .skip(self.history.len() - newer)
            .filter(|c| c.kind == kind)
            .cloned()
            .collect())
    }

    /// Every stored object of both Event kinds, in order of creation.
    pub(crate) fn events(&self) -> Vec<Value> {
        let mut events: Vec<(u64, &Value)> = self
            .objects
            .iter()
            .filter(|((kind, _), _)| matches!(kind, Kind::Event | Kind::EventV1))
            .map(|(_, entry)| (entry.created, &entry.object))
            .collect();
        events.sort_by_key(|(created, _)| *created);
        events.into_iter().map(|(_, obj)| obj.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "ns" },
            "spec": { "nodeName": node },
        })
    }

    #[test]
    fn snapshot_undoes_later_changes() {
        let mut store = Store::new();
        store.put(Kind::Pod, pod("a", "n1"));
        let at = store.rv();
        store.put(Kind::Pod, pod("a", "n2"));
        store.put(Kind::Pod, pod("b", "n1"));
        store.remove(Kind::Pod, "ns/a");
        let then = store.snapshot(Kind::Pod, Some(at)).unwrap();
        assert_eq!(then.len(), 1);
        assert_eq!(then[0].1["spec"]["nodeName"], "n1");
        let now = store.snapshot(Kind::Pod, None).unwrap();
        assert_eq!(now.len(), 1);
        assert_eq!(now[0].0, "ns/b");
        store.compact();
        assert!(store.snapshot(Kind::Pod, Some(at)).is_err());
        assert!(store.changes_since(Kind::Pod, at).is_err());
        assert!(
            store
                .changes_since(Kind::Pod, store.rv())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn replace_keeps_uid_and_creation() {
        let mut store = Store::new();
        let (first, change) = store.put(Kind::Pod, pod("a", "n1"));
        assert_eq!(change, ChangeType::Added);
        let (second, change) = store.put(Kind::Pod, pod("a", "n2"));
        assert_eq!(change, ChangeType::Modified);
        assert_eq!(first["metadata"]["uid"], second["metadata"]["uid"]);
        assert_ne!(
            first["metadata"]["resourceVersion"],
            second["metadata"]["resourceVersion"]
        );
        let changes = store.changes_since(Kind::Pod, 1).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1].prev.as_ref().unwrap()["spec"]["nodeName"], "n1");
    }
}
