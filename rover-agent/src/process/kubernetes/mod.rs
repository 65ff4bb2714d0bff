//! Processes of the pods on this node.

pub mod analyzer;
