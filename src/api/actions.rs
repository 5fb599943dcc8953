//! Operator actions: reset a client's disk, commit it to a new image, close a session,
//! reload the configuration. One action at a time per client: a second one while the first
//! runs gets 409 Conflict and changes nothing.

use super::view::{client, find_client};
use super::{Api, ApiError};
use dashmap::DashMap;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Actions in progress, by client (or "reload").
#[derive(Debug, Default)]
pub struct Guard(DashMap<String, &'static str>);

/// Holds a client's action slot; released on drop.
pub struct Slot<'a>(&'a Guard, String);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0 .0.remove(&self.1);
    }
}

impl Guard {
    /// Take `key`'s slot for `what`, or 409 if another action holds it.
    pub fn take(&self, key: &str, what: &'static str) -> Result<Slot<'_>, ApiError> {
        use dashmap::mapref::entry::Entry;
        match self.0.entry(key.to_string()) {
            Entry::Occupied(o) => Err(ApiError::Conflict(format!(
                "{} is in progress on {key}; try again when it is done",
                o.get()
            ))),
            Entry::Vacant(v) => {
                v.insert(what);
                Ok(Slot(self, key.to_string()))
            }
        }
    }
}

/// Refuse body fields an action does not know (a typo must not pass as a default).
fn only_fields(body: &Value, allowed: &[&str]) -> Result<(), ApiError> {
    if let Some(obj) = body.as_object() {
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::BadRequest(format!("unknown field {k:?}")));
        }
    }
    Ok(())
}

/// The client's disk, opened if the server has not seen it since it started.
async fn open_client(
    boot: &Arc<crate::boot::BootTarget>,
    name: &str,
) -> Result<Arc<crate::boot::Client>, ApiError> {
    if let Some(c) = boot.client(name) {
        return Ok(c);
    }
    let (b, n) = (boot.clone(), name.to_string());
    tokio::task::spawn_blocking(move || b.attach(&n))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| match e {
            crate::boot::AttachError::DirectBusy { .. } => ApiError::Conflict(e.to_string()),
            crate::boot::AttachError::NoBinding(_) => ApiError::NotFound(e.to_string()),
            crate::boot::AttachError::Storage(_) => ApiError::Internal(e.to_string()),
            crate::boot::AttachError::Unavailable(_) => ApiError::Conflict(e.to_string()),
        })
}

/// `POST /clients/{initiator}/reset`: close the client's sessions and discard its overlay
/// (as `diskless client reset`).
pub async fn reset(api: &Api, initiator: &str, body: &Value) -> Result<Value, ApiError> {
    only_fields(body, &[])?;
    let (boot, name) = find_client(api, initiator)?;
    let _slot = api.guard.take(&name, "an action")?;
    open_client(&boot, &name).await?;
    let done = api
        .server
        .reset_client(&boot.name, &name)
        .await
        .map_err(|e| match e {
            crate::session::ResetError::Failed(m) => ApiError::Internal(m),
            // etcd did not take the mark in time: a condition to retry, not a server bug.
            e @ crate::session::ResetError::NotDurable { .. } => {
                ApiError::Unavailable(e.to_string())
            }
        })?;
    Ok(json!({
        "result": "reset",
        "rbd_recreate": done.rbd_recreate,
        "client": client(api, &name)?,
    }))
}

/// `POST /clients/{initiator}/commit {"file": NAME}`: write golden image + overlay into a
/// new image file NAME beside the client's golden image (never over an existing file).
pub async fn commit(api: &Api, initiator: &str, body: &Value) -> Result<Value, ApiError> {
    only_fields(body, &["file"])?;
    let file = body
        .get("file")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("commit needs {\"file\": \"NAME.img\"}".into()))?;
    if file.is_empty()
        || file.len() > 255
        || file.starts_with('.')
        || file.contains(['/', '\\', '\0'])
    {
        return Err(ApiError::BadRequest(format!(
            "{file:?} is not a plain file name (it is created beside the golden image)"
        )));
    }
    let (boot, name) = find_client(api, initiator)?;
    let _slot = api.guard.take(&name, "an action")?;
    let c = open_client(&boot, &name).await?;
    let dir = c
        .image()
        .path
        .parent()
        .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf());
    let path = dir.join(file);
    if path.exists() {
        return Err(ApiError::Conflict(format!(
            "{} exists already",
            path.display()
        )));
    }
    let mode = c.mode();
    if mode != crate::config::OverlayMode::Volatile
        && mode != crate::config::OverlayMode::Persistent
    {
        return Err(ApiError::Conflict(format!(
            "client {name} has no overlay ({mode} mode): nothing to commit"
        )));
    }
    let target = path.clone();
    tokio::task::spawn_blocking(move || c.commit_to(&target))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::Internal)?;
    Ok(json!({ "result": "committed", "path": path.display().to_string() }))
}

/// `POST /clients/{initiator}/next-boot {"image": SPEC, "mode": MODE}` (either or both) or
/// `{"clear": true}`, and `DELETE` (clear): the operator's override of the client's image
/// and/or mode, taken at its next boot and kept until cleared (`boot::nextboot`). Stored
/// durably before the answer; refused requests change nothing.
pub async fn next_boot(
    api: &Api,
    initiator: &str,
    body: &Value,
    by: &str,
) -> Result<Value, ApiError> {
    use crate::boot::nextboot::{self, NextBootError};
    only_fields(body, &["image", "mode", "clear"])?;
    fn text<'a>(body: &'a Value, k: &str) -> Result<Option<&'a str>, ApiError> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(ApiError::BadRequest(format!("{k} must be a string"))),
        }
    }
    let clear = match body.get("clear") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::BadRequest("clear must be true or false".into())),
    };
    let req = nextboot::request(text(body, "image")?, text(body, "mode")?, clear)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let (boot, name) = find_client(api, initiator)?;
    let _slot = api.guard.take(&name, "an action")?;
    let cleared = req == nextboot::Request::Clear;
    crate::control::set_next_boot(&api.server, &boot, &name, req, by)
        .await
        .map_err(|e| match e {
            NextBootError::Invalid(m) => ApiError::BadRequest(m),
            NextBootError::UnknownImage(m) | NextBootError::Refused(m) => {
                ApiError::Unprocessable(m)
            }
            e @ (NextBootError::Io { .. }
            | NextBootError::Parse { .. }
            | NextBootError::Internal(_)) => ApiError::Internal(e.to_string()),
        })?;
    let view = client(api, &name)?;
    let mut note =
        String::from("taken at the client's next boot; a running client keeps its disk until then");
    if view["mode"] == "persistent" && !view["next_disk"].is_null() {
        note.push_str(
            "; its persistent disk is not discarded: it is kept on the server (kept/ in the \
             client's directory) and used again if the client comes back to it in persistent mode",
        );
    }
    Ok(json!({
        "result": if cleared { "cleared" } else { "set" },
        "note": note,
        "client": view,
    }))
}

/// `POST /sessions/{tsih}/close`: ask the session to close and wait (bounded) until it has.
pub async fn close_session(api: &Api, tsih: &str) -> Result<Value, ApiError> {
    let n: u16 = tsih
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{tsih:?} is not a TSIH (1-65535)")))?;
    let s = api
        .server
        .sessions()
        .get(n)
        .ok_or_else(|| ApiError::NotFound(format!("no session {n}")))?;
    let _slot = api
        .guard
        .take(&s.initiator.to_ascii_lowercase(), "an action")?;
    s.close(Duration::from_secs(5)).await;
    api.server.sessions().remove(n);
    Ok(json!({ "result": "closed", "tsih": n, "initiator": s.initiator }))
}

/// `POST /reload`: re-read targets.yaml (as `diskless reload` / SIGHUP).
pub fn reload(api: &Api) -> Result<Value, ApiError> {
    let path = api.config_path.as_deref().ok_or_else(|| {
        ApiError::Conflict("quick mode has no configuration file to reload".into())
    })?;
    let _slot = api.guard.take("reload", "a reload")?;
    let msg = crate::control::reload(&api.server, path).map_err(ApiError::Unprocessable)?;
    Ok(json!({ "result": "reloaded", "message": msg.trim() }))
}
