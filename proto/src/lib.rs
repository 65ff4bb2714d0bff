//! The SkyWalking v3 protocol (package `skywalking.v3`) as rover-rs uses it: messages and gRPC
//! clients for the agent, servers for test doubles. Generated from the `.proto` files beside
//! this crate, whose names and field numbers are upstream's.

#![expect(clippy::all, clippy::pedantic, reason = "generated code")]

/// Everything in package `skywalking.v3`.
pub mod v3 {
    tonic::include_proto!("skywalking.v3");
}
