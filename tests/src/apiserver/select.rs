//! Query parameters and the selectors of list and watch requests.

use serde_json::Value;

use super::store::Kind;

/// The decoded query string.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(query: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The first value of `key`; an empty value counts as absent, as on
    /// the real server.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// A boolean parameter, parsed as Go's `strconv.ParseBool` does.
    pub(crate) fn flag(&self, key: &str) -> bool {
        matches!(
            self.get(key),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True")
        )
    }
}

/// One requirement of a label selector.
#[derive(Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
/// `k notin (a,b)`, comma-separated (all must hold).
#[derive(Debug, Default)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_label_req(part)?);
        }
        Ok(Self(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v),
            LabelReq::Ne(k, v) => get(k) != Some(v),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        })
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b` is two parts).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_label_req(part: &str) -> Result<LabelReq, String> {
    let invalid = || format!("unable to parse requirement: {part:?}");
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        return valid_key(key)
            .then(|| LabelReq::NotExists(key.to_owned()))
            .ok_or_else(invalid);
    }
    for (op, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = part.split_once(op) {
            let key = key.trim();
            let set = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(invalid)?;
            let values = set.split(',').map(|v| v.trim().to_owned()).collect();
            if !valid_key(key) {
                return Err(invalid());
            }
            return Ok(if negated {
                LabelReq::NotIn(key.to_owned(), values)
            } else {
                LabelReq::In(key.to_owned(), values)
            });
        }
    }
    let req = if let Some((k, v)) = part.split_once("!=") {
        LabelReq::Ne(k.trim().to_owned(), v.trim().to_owned())
    } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        LabelReq::Eq(k.trim().to_owned(), v.trim().to_owned())
    } else {
        LabelReq::Exists(part.to_owned())
    };
    match &req {
        LabelReq::Eq(k, _) | LabelReq::Ne(k, _) | LabelReq::Exists(k) if valid_key(k) => Ok(req),
        _ => Err(invalid()),
    }
}

/// A field selector: `field=value`, `field==value`, `field!=value`,
/// comma-separated, over the fields the real server supports for the kind.
#[derive(Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(text: &str, kind: Kind) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_unescaped(text, ',') {
            if part.trim().is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = split_op(&part, "!=") {
                (f, false, v)
            } else if let Some((f, v)) = split_op(&part, "==").or_else(|| split_op(&part, "=")) {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim().to_owned();
            if !field_labels(kind).contains(&field.as_str()) {
                return Err(format!("field label not supported: {field}",));
            }
            reqs.push((field, equal, unescape(&value)));
        }
        Ok(Self(reqs))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (field_value(object, field) == *value) == *equal)
    }
}

/// The field labels the real server accepts per kind.
fn field_labels(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Pod => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        Kind::Namespace => &["metadata.name", "status.phase"],
        Kind::DaemonSet => &["metadata.name", "metadata.namespace"],
        Kind::Event => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        Kind::EventV1 => &[
            "metadata.name",
            "metadata.namespace",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
    }
}

/// A field's value as the real server's field set has it: strings as they
/// are, booleans as `true`/`false`, absent as empty (`spec.hostNetwork`:
/// `false`).
fn field_value(object: &Value, field: &str) -> String {
    let path = if field == "source" {
        "source.component"
    } else {
        field
    };
    let value = path.split('.').fold(object, |v, part| &v[part]);
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ if field == "spec.hostNetwork" => "false".to_owned(),
        _ => String::new(),
    }
}

/// Splits `text` at `sep` not preceded by a backslash.
fn split_unescaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            parts.last_mut().unwrap().extend(['\\', c]);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            parts.last_mut().unwrap().push(c);
        }
    }
    parts
}

/// `field<op>value` at the first unescaped `op`.
fn split_op(part: &str, op: &str) -> Option<(String, String)> {
    let mut i = 0;
    while i < part.len() {
        if part[i..].starts_with('\\') {
            i += 2;
            continue;
        }
        if part[i..].starts_with(op) {
            return Some((part[..i].to_owned(), part[i + op.len()..].to_owned()));
        }
        i += part[i..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

fn unescape(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// What a list or watch selects: the path's namespace and name, and the
/// label and field selectors.
#[derive(Debug, Default)]
pub(crate) struct Filter {
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) labels: LabelSelector,
    pub(crate) fields: FieldSelector,
}

impl Filter {
    pub(crate) fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        self.namespace
            .as_deref()
            .is_none_or(|ns| meta["namespace"] == ns)
            && self.name.as_deref().is_none_or(|n| meta["name"] == n)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// True when a selector narrows the result (the real server then
    /// leaves `remainingItemCount` out of a list page).
    pub(crate) fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value, node: &str) -> Value {
        json!({ "metadata": { "name": "p", "namespace": "ns", "labels": labels },
                "spec": { "nodeName": node } })
    }

    #[test]
    fn label_selectors() {
        let p = pod(json!({ "app": "web", "tier": "front" }), "n1");
        let yes = [
            "app=web",
            "app==web",
            "app",
            "!other",
            "app!=db",
            "other!=x",
            "app in (db, web)",
            "app notin (db),tier",
            "app=web,tier=front",
            "",
        ];
        for sel in yes {
            assert!(LabelSelector::parse(sel).unwrap().matches(&p), "{sel}");
        }
        let no = [
            "app=db",
            "other",
            "!app",
            "app!=web",
            "app in (db)",
            "app=web,tier=back",
        ];
        for sel in no {
            assert!(!LabelSelector::parse(sel).unwrap().matches(&p), "{sel}");
        }
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selectors() {
        let p = pod(json!({}), "n1");
        let sel = |s| FieldSelector::parse(s, Kind::Pod).unwrap();
        assert!(sel("spec.nodeName=n1").matches(&p));
        assert!(sel("spec.nodeName==n1,metadata.namespace=ns").matches(&p));
        assert!(!sel("spec.nodeName!=n1").matches(&p));
        assert!(sel("spec.hostNetwork=false").matches(&p));
        assert!(sel("status.podIP=").matches(&p));
        assert!(FieldSelector::parse("spec.bogus=x", Kind::Pod).is_err());
        assert!(FieldSelector::parse("spec.nodeName", Kind::Pod).is_err());
        assert!(sel(r"metadata.name=a\,b").0[0].2 == "a,b");
    }
}
