//! Shared scaffolding for the integration tests.
