//! `fibril-ui`: the web UI over Hubble Relay (or one agent's Hubble API).
//!
//! The server does the work a browser could not do at 100,000 flows/s: a
//! page's query becomes the relay's allow and deny lists (`filter`), its
//! flows become a service map and a protocol breakdown (`aggregate`), and
//! the page gets those and a sample of the flows over one push channel
//! (`session`, `server`). Drops no rule allowed are explained by the
//! policies selecting their endpoint, asked of the agents (`selection`).

#![forbid(unsafe_code)]

pub mod access;
pub mod aggregate;
pub mod filter;
pub mod selection;
pub mod server;
pub mod session;
