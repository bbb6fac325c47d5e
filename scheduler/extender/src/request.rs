//! The verbs' domain requests, decoded from the extender/v1 wire bodies by [`crate::http`].
//!
//! Filter and prioritize carry up to every node's name (5,000 at a time). The names are decoded
//! borrowed from the request body: a name without JSON escapes (every valid node name) is a
//! slice of the body, not a string of its own; only the filter copies them, into its verdicts.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use tessera_core::NodeName;

use crate::error::Error;
use crate::wire::{ExtenderArgs, NodeList};

/// How kube-scheduler offered the nodes (`nodeCacheCapable` in its extender config).
#[derive(Debug)]
pub enum Offered<'a> {
    /// `nodeCacheCapable: true`: node names only.
    Names(Vec<Cow<'a, str>>),
    /// `nodeCacheCapable: false`: full Node objects; the filter answers with the ones that pass.
    Nodes(NodeList),
}

impl Offered<'_> {
    /// The offered names as the core's node names (copies: they live on in the verdicts),
    /// written into the strings of forgotten verdicts' names where this thread kept some
    /// ([`recycle_names`]).
    pub fn node_names(&self) -> Result<Vec<NodeName>, Error> {
        let names = self.names()?;
        Ok(POOL.with_borrow_mut(|pool| {
            names
                .into_iter()
                .map(|n| match pool.pop() {
                    Some(mut s) => {
                        s.clear();
                        s.push_str(n);
                        NodeName(s)
                    }
                    None => NodeName(n.to_owned()),
                })
                .collect()
        }))
    }

    /// The offered names, borrowed.
    pub fn names(&self) -> Result<Vec<&str>, Error> {
        match self {
            Offered::Names(names) => Ok(names.iter().map(AsRef::as_ref).collect()),
            Offered::Nodes(list) => list
                .items
                .iter()
                .map(|n| {
                    n.metadata
                        .name
                        .as_deref()
                        .ok_or_else(|| Error::BadRequest("a node in Nodes has no metadata.name".into()))
                })
                .collect(),
        }
    }
}

/// Most name strings a thread keeps for [`Offered::node_names`] (two filters of 8,192 nodes).
const POOL_NAMES: usize = 16_384;

/// Longest name string kept (a DNS subdomain, a node name's limit).
const POOL_NAME_BYTES: usize = 253;

thread_local! {
    /// Strings of forgotten verdicts' node names, for the next filter's names: a filter at
    /// full cluster size names every node, and a string written in place costs no allocation
    /// here and no free when the verdicts are forgotten.
    static POOL: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Drops `verdicts`, keeping their names' strings for [`Offered::node_names`] on this thread
/// when nothing else holds them.
pub(crate) fn recycle_names(verdicts: std::sync::Arc<Vec<tessera_core::policy::NodeVerdict>>) {
    let Ok(verdicts) = std::sync::Arc::try_unwrap(verdicts) else { return };
    POOL.with_borrow_mut(|pool| {
        let room = POOL_NAMES.saturating_sub(pool.len());
        pool.extend(verdicts.into_iter().map(|v| v.node.0).filter(|s| s.capacity() <= POOL_NAME_BYTES).take(room));
    });
}

/// A filter or prioritize: the pod and the nodes offered for it.
#[derive(Debug)]
pub struct NodesRequest<'a> {
    pub pod: Box<Pod>,
    pub offered: Offered<'a>,
}

impl<'a> NodesRequest<'a> {
    /// Decodes a filter or prioritize body; names stay borrowed from `body` where they can.
    pub fn decode(verb: &'static str, body: &'a [u8]) -> Result<Self, Error> {
        let args: ArgsIn<'a> = serde_json::from_slice(body).map_err(|source| Error::Decode { verb, source })?;
        Self::new(args.pod, args.nodes, args.node_names.map(|n| n.into_iter().map(|Name(c)| c).collect()))
    }

    /// Checks the wire fields: some nodes offered (names win over Node objects, as in
    /// kube-scheduler) and a pod.
    fn new(pod: Option<Box<Pod>>, nodes: Option<NodeList>, names: Option<Vec<Cow<'a, str>>>) -> Result<Self, Error> {
        let offered = match (names, nodes) {
            (Some(n), _) => Offered::Names(n),
            (None, Some(list)) => Offered::Nodes(list),
            (None, None) => {
                return Err(Error::BadRequest("both NodeNames and Nodes are null; nothing to filter".into()));
            }
        };
        let pod = pod.ok_or_else(|| Error::BadRequest("ExtenderArgs.Pod is null".into()))?;
        Ok(Self { pod, offered })
    }
}

impl TryFrom<ExtenderArgs> for NodesRequest<'static> {
    type Error = Error;

    fn try_from(a: ExtenderArgs) -> Result<Self, Error> {
        Self::new(a.pod, a.nodes, a.node_names.map(|n| n.into_iter().map(Cow::Owned).collect()))
    }
}

/// [`ExtenderArgs`] with the names borrowed from the body.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArgsIn<'a> {
    #[serde(default, alias = "pod")]
    pod: Option<Box<Pod>>,
    #[serde(default, alias = "nodes")]
    nodes: Option<NodeList>,
    #[serde(default, borrow, alias = "nodenames", alias = "nodeNames")]
    node_names: Option<Vec<Name<'a>>>,
}

/// A node name, borrowed from the input unless it has escapes (serde's own `Cow<str>` is always
/// owned inside a list).
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a node name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Name<'a>, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_borrowed_unless_escaped() {
        let body = br#"{"Pod":{"metadata":{"name":"p","namespace":"ml"}},"NodeNames":["gpu-1","gpu\u002d2"]}"#;
        let r = NodesRequest::decode("filter", body).unwrap();
        let Offered::Names(n) = &r.offered else { panic!("names expected") };
        assert!(matches!(&n[0], Cow::Borrowed("gpu-1")));
        assert!(matches!(&n[1], Cow::Owned(s) if s == "gpu-2"));
    }

    #[test]
    fn lowercase_keys_and_bad_input_are_clear_errors() {
        let r = NodesRequest::decode("filter", br#"{"pod":{"metadata":{"name":"p"}},"nodenames":["a"]}"#).unwrap();
        assert_eq!(r.names_for_test(), vec!["a"]);
        let e = NodesRequest::decode("filter", br#"{"Pod":null,"NodeNames":["a"]}"#).unwrap_err();
        assert_eq!(e.chain(), "ExtenderArgs.Pod is null");
        let e = NodesRequest::decode("filter", br#"{"Pod":{}}"#).unwrap_err();
        assert_eq!(e.chain(), "both NodeNames and Nodes are null; nothing to filter");
        let e = NodesRequest::decode("prioritize", br#"{"NodeNames":[1]}"#).unwrap_err();
        assert!(
            e.chain().starts_with("decoding prioritize arguments: invalid type: integer `1`, expected a node name")
        );
        let e = NodesRequest::decode("filter", br#"{"NodeNames":"#).unwrap_err();
        assert!(e.chain().starts_with("decoding filter arguments: EOF"), "{}", e.chain());
    }

    impl NodesRequest<'_> {
        fn names_for_test(&self) -> Vec<&str> {
            self.offered.names().unwrap()
        }
    }
}
