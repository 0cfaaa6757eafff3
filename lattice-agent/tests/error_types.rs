//! Errors stay typed: no error type (a `thiserror::Error` derive) of the
//! agent or the CNI plugin carries its cause or reason as text, and no
//! function fails with text (`Result<_, String>`). A field of type
//! `String` (or `Box<str>`, `Arc<str>`, `Rc<str>`, `Cow<str>`) is flagged
//! when it is unnamed (`Variant(String)`: the whole error is a message)
//! or named like a message (`reason`, `detail`, ...). Causes are kept as
//! `#[source]` and rendered once where they meet a user (`error_chain`);
//! data an error names (a path, a pod, a value) has a name of its own.

use std::path::{Path, PathBuf};

use lattice_tests::{rust_sources, workspace};

use syn::visit::Visit;

/// Field names that say the field holds an error's text.
const MESSAGE_NAMES: [&str; 13] = [
    "reason",
    "reasons",
    "detail",
    "details",
    "message",
    "msg",
    "why",
    "error",
    "err",
    "cause",
    "text",
    "description",
    "problem",
];

/// Types exempt, with why: (file relative to the workspace, type).
const EXEMPT: [(&str, &str, &str); 1] = [(
    "lattice-cni/src/plugin/error.rs",
    "CniError",
    "the CNI spec's error object as the plugin prints it for the runtime: \
     its msg and details are the rendering, made once where the plugin fails",
)];

/// Whether `attrs` derive `thiserror::Error` (or `Error`, imported from
/// thiserror, as `use thiserror::Error` brings it in).
fn derives_error(attrs: &[syn::Attribute], imports_error: bool) -> bool {
    attrs.iter().any(|attr| {
        if !attr.path().is_ident("derive") {
            return false;
        }
        let mut found = false;
        let _ = attr.parse_nested_meta(|meta| {
            let segments: Vec<String> = meta
                .path
                .segments
                .iter()
                .map(|s| s.ident.to_string())
                .collect();
            match segments.as_slice() {
                [krate, name] if krate == "thiserror" && name == "Error" => found = true,
                [name] if name == "Error" && imports_error => found = true,
                _ => {}
            }
            Ok(())
        });
        found
    })
}

/// `String`, or a `str` behind `Box`, `Arc`, `Rc` or `Cow`.
fn is_text(ty: &syn::Type) -> bool {
    let syn::Type::Path(p) = ty else {
        return false;
    };
    let Some(last) = p.path.segments.last() else {
        return false;
    };
    if last.ident == "String" {
        return true;
    }
    let wraps_str = ["Box", "Arc", "Rc", "Cow"].iter().any(|w| last.ident == w);
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return false;
    };
    wraps_str
        && args.args.iter().any(|a| {
            matches!(a, syn::GenericArgument::Type(syn::Type::Path(t)) if t.path.is_ident("str"))
        })
}

/// The text fields of one error type's fields, as `Type::Variant.field`.
fn text_fields(owner: &str, fields: &syn::Fields, out: &mut Vec<String>) {
    for (i, field) in fields.iter().enumerate() {
        if !is_text(&field.ty) {
            continue;
        }
        match &field.ident {
            None => out.push(format!("{owner}.{i} (an unnamed String)")),
            Some(name) if MESSAGE_NAMES.contains(&name.to_string().as_str()) => {
                out.push(format!("{owner}.{name} (a message held as a String)"));
            }
            Some(_) => {}
        }
    }
}

/// Whether `p` is `Result<_, <text>>`.
fn fails_with_text(p: &syn::TypePath) -> bool {
    let Some(last) = p.path.segments.last() else {
        return false;
    };
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return false;
    };
    last.ident == "Result"
        && matches!(
            args.args.iter().nth(1),
            Some(syn::GenericArgument::Type(error)) if is_text(error)
        )
}

struct Finder<'a> {
    imports_error: bool,
    exempt: &'a [&'a str],
    /// The function whose signature is being read.
    fn_name: Option<String>,
    found: Vec<String>,
}

impl<'ast> Visit<'ast> for Finder<'_> {
    fn visit_item_enum(&mut self, e: &'ast syn::ItemEnum) {
        let name = e.ident.to_string();
        if derives_error(&e.attrs, self.imports_error) && !self.exempt.contains(&name.as_str()) {
            for v in &e.variants {
                text_fields(&format!("{name}::{}", v.ident), &v.fields, &mut self.found);
            }
        }
        syn::visit::visit_item_enum(self, e);
    }

    fn visit_item_struct(&mut self, s: &'ast syn::ItemStruct) {
        let name = s.ident.to_string();
        if derives_error(&s.attrs, self.imports_error) && !self.exempt.contains(&name.as_str()) {
            text_fields(&name, &s.fields, &mut self.found);
        }
        syn::visit::visit_item_struct(self, s);
    }

    fn visit_signature(&mut self, sig: &'ast syn::Signature) {
        let outer = self.fn_name.replace(sig.ident.to_string());
        syn::visit::visit_signature(self, sig);
        self.fn_name = outer;
    }

    fn visit_type_path(&mut self, p: &'ast syn::TypePath) {
        if fails_with_text(p) {
            let place = match &self.fn_name {
                Some(f) => format!("fn {f}"),
                None => "a type".to_owned(),
            };
            self.found
                .push(format!("{place}: a Result that fails with a String"));
        }
        syn::visit::visit_type_path(self, p);
    }
}

/// The error types' text fields in one file's source.
fn text_errors(source: &str, exempt: &[&str]) -> Vec<String> {
    let file = syn::parse_file(source).expect("the source parses");
    let mut finder = Finder {
        imports_error: source.contains("use thiserror::Error"),
        exempt,
        fn_name: None,
        found: Vec::new(),
    };
    finder.visit_file(&file);
    finder.found
}

#[test]
fn no_error_type_holds_its_reason_as_text() {
    let workspace = workspace();
    let files: Vec<PathBuf> = ["lattice-agent/src", "lattice-cni/src"]
        .iter()
        .flat_map(|krate| rust_sources(&workspace.join(krate)))
        .collect();
    assert!(files.len() > 40, "found the sources: {files:?}");
    let mut offenders = Vec::new();
    let mut error_types = 0;
    for file in &files {
        let relative = file.strip_prefix(&workspace).expect("in the workspace");
        let exempt: Vec<&str> = EXEMPT
            .iter()
            .filter(|(f, _, _)| relative == Path::new(f))
            .map(|(_, t, _)| *t)
            .collect();
        let text = std::fs::read_to_string(file).expect("readable source");
        error_types += text.matches("thiserror::Error").count();
        for found in text_errors(&text, &exempt) {
            offenders.push(format!("{}: {found}", relative.display()));
        }
    }
    assert!(error_types > 20, "found the error types ({error_types})");
    assert!(
        offenders.is_empty(),
        "error types holding text instead of a typed cause (make the cause a \
         #[source], or name the data it is):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_check_sees_text_in_an_error() {
    let bad = r#"
        #[derive(Debug, thiserror::Error)]
        pub enum E {
            #[error("x: {0}")]
            Flat(String),
            #[error("{path}: {reason}")]
            Reason { path: std::path::PathBuf, reason: String },
            #[error("{0}")]
            Shared(std::sync::Arc<str>),
        }
        mod inner {
            use thiserror::Error;
            #[derive(Debug, Error)]
            #[error("{0}")]
            pub struct Message(pub Box<str>);
        }
        impl E {
            fn lookup(&self) -> Result<u32, String> { Err(String::new()) }
        }
        struct Outcome(Option<Result<(), Box<str>>>);
    "#;
    assert_eq!(
        text_errors(bad, &[]),
        [
            "E::Flat.0 (an unnamed String)",
            "E::Reason.reason (a message held as a String)",
            "E::Shared.0 (an unnamed String)",
            "Message.0 (an unnamed String)",
            "fn lookup: a Result that fails with a String",
            "a type: a Result that fails with a String",
        ]
    );
    let good = r#"
        #[derive(Debug, thiserror::Error)]
        pub enum E {
            #[error("pod {pod}")]
            Pod { pod: String, #[source] source: std::io::Error },
            #[error("map {0}")]
            Map(&'static str),
        }
        #[derive(Debug)]
        pub enum NotAnError { Text(String) }
        fn name() -> Result<String, E> { Ok(String::new()) }
    "#;
    assert!(text_errors(good, &[]).is_empty());
    assert_eq!(
        text_errors(bad, &["E", "Message"]),
        [
            "fn lookup: a Result that fails with a String",
            "a type: a Result that fails with a String",
        ]
    );
}
