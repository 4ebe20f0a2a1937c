//! Publishing task events to containerd over its ttrpc events service (the address
//! containerd gives its shims in `TTRPC_ADDRESS`). One thread sends them in order, so a
//! slow containerd never holds up a Task call.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageDyn, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::topics;
use containerd_shim_protos::EventsClient;

pub fn now() -> Timestamp {
    to_timestamp(std::time::SystemTime::now())
}

pub fn to_timestamp(t: std::time::SystemTime) -> Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = d.as_secs() as i64;
    ts.nanos = d.subsec_nanos() as i32;
    ts
}

/// An event for containerd.
pub enum Event {
    Create(TaskCreate),
    Start(TaskStart),
    Exit(TaskExit),
    Oom(TaskOOM),
    ExecAdded(TaskExecAdded),
    ExecStarted(TaskExecStarted),
    Paused(TaskPaused),
    Resumed(TaskResumed),
    Delete(TaskDelete),
}

impl Event {
    fn parts(&self) -> (&'static str, &dyn MessageDyn) {
        match self {
            Event::Create(e) => (topics::TASK_CREATE_EVENT_TOPIC, e),
            Event::Start(e) => (topics::TASK_START_EVENT_TOPIC, e),
            Event::Exit(e) => (topics::TASK_EXIT_EVENT_TOPIC, e),
            Event::Oom(e) => (topics::TASK_OOM_EVENT_TOPIC, e),
            Event::ExecAdded(e) => (topics::TASK_EXEC_ADDED_EVENT_TOPIC, e),
            Event::ExecStarted(e) => (topics::TASK_EXEC_STARTED_EVENT_TOPIC, e),
            Event::Paused(e) => (topics::TASK_PAUSED_EVENT_TOPIC, e),
            Event::Resumed(e) => (topics::TASK_RESUMED_EVENT_TOPIC, e),
            Event::Delete(e) => (topics::TASK_DELETE_EVENT_TOPIC, e),
        }
    }
}

enum Msg {
    Event(Event),
    Flush(Sender<()>),
}

pub struct Publisher {
    tx: Mutex<Sender<Msg>>,
}

impl Publisher {
    /// Publishes to the containerd at `ttrpc_address` (a socket path, `unix://` optional)
    /// in `namespace`.
    pub fn new(ttrpc_address: String, namespace: String) -> Publisher {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || send_loop(&ttrpc_address, &namespace, rx))
            .expect("spawning the event thread");
        Publisher { tx: Mutex::new(tx) }
    }

    pub fn publish(&self, e: Event) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Msg::Event(e));
        }
    }

    /// Waits (at most `timeout`) until the events published so far are sent.
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = channel();
        if let Ok(q) = self.tx.lock() {
            let _ = q.send(Msg::Flush(tx));
        }
        let _ = rx.recv_timeout(timeout);
    }
}

fn send_loop(address: &str, namespace: &str, rx: Receiver<Msg>) {
    let mut client: Option<EventsClient> = None;
    for msg in rx {
        let event = match msg {
            Msg::Event(e) => e,
            Msg::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let (topic, message) = event.parts();
        let mut any = Any::new();
        any.type_url = message.descriptor_dyn().full_name().to_string();
        any.value = match message.write_to_bytes_dyn() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("encoding event {topic}: {e}");
                continue;
            }
        };
        let mut envelope = Envelope::new();
        envelope.timestamp = MessageField::some(now());
        envelope.namespace = namespace.to_string();
        envelope.topic = topic.to_string();
        envelope.event = MessageField::some(any);
        let mut req = ForwardRequest::new();
        req.envelope = MessageField::some(envelope);
        // One reconnect per event: containerd may have restarted.
        for _ in 0..2 {
            if client.is_none() {
                let target = if address.contains("://") {
                    address.to_string()
                } else {
                    format!("unix://{address}")
                };
                match ttrpc::Client::connect(&target) {
                    Ok(c) => client = Some(EventsClient::new(c)),
                    Err(e) => {
                        tracing::warn!("connecting to containerd's events at {target}: {e}");
                        break;
                    }
                }
            }
            let Some(c) = &client else { break };
            let ctx = ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64);
            match c.forward(ctx, &req) {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!("publishing {topic}: {e}");
                    client = None;
                }
            }
        }
    }
}
