//! The spec's host-side hooks: prestart and createRuntime while `create` runs (before the
//! container is made in the guest), poststart after `start`, poststop when the container
//! is deleted. createContainer and startContainer hooks run in the guest (the agent), on
//! the container's side of the VM boundary.

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Prestart,
    CreateRuntime,
    Poststart,
    Poststop,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Prestart => "prestart",
            Kind::CreateRuntime => "createRuntime",
            Kind::Poststart => "poststart",
            Kind::Poststop => "poststop",
        }
    }
}

/// Runs the `kind` hooks of `spec` (the bundle's config.json) in order, `state` on their
/// stdin; stops at the first failure.
pub fn run(spec: &Value, kind: Kind, state: &Value) -> Result<()> {
    let Some(list) = spec["hooks"][kind.key()].as_array() else {
        return Ok(());
    };
    let state = serde_json::to_vec(state)?;
    for h in list {
        let hook: oci_spec::runtime::Hook = serde_json::from_value(h.clone())
            .with_context(|| format!("hooks.{}: {h} is not a hook", kind.key()))?;
        hull_protocol::hooks::run(
            &hook.path().to_string_lossy(),
            hook.args().as_deref().unwrap_or_default(),
            hook.env().as_deref().unwrap_or_default(),
            hook.timeout(),
            &state,
        )
        .map_err(|e| anyhow!("{} {e}", kind.key()))?;
    }
    Ok(())
}

/// For the hooks whose failure does not stop the lifecycle (poststart, poststop): as the
/// runtime spec asks, a warning.
pub fn run_or_warn(spec: &Value, kind: Kind, state: &Value) {
    if let Err(e) = run(spec, kind, state) {
        tracing::warn!("{e:#}");
        eprintln!("hull: warning: {e:#}");
    }
}
