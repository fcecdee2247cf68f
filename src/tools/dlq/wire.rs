//! A small AMQP 0-9-1 client of the dlq tools' own, for what lapin cannot do.
//!
//! RabbitMQ passes a message's short-string properties (message_id, type…) and
//! header keys through as the publisher sent them, UTF-8 or not; lapin's parser
//! rejects such a content header and drops the whole connection, and the broker
//! then requeues every message the connection held (on a quorum queue, counting
//! a delivery on each). A dead-letter queue is where such messages end up, so the
//! tools read it with this client instead: it speaks just what they need
//! (connect, channels, passive and probing `queue.declare`, `basic.get`, `ack`,
//! `nack`, confirmed `basic.publish`), parses method frames with amq-protocol
//! (lapin's own codec), and keeps each content header as the bytes it came in
//! ([`RawProperties`]): a message is shown with its undecodable bytes replaced,
//! and republished byte for byte.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use lapin::BasicProperties;
use lapin::protocol::{AMQPClass, basic, channel, confirm, connection, queue};
use lapin::types::generation::{SerializeFn, gen_field_table};
use lapin::types::parsing::parse_field_table;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPUri, SASLMechanism};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// What we offer at tune: lapin's default.
const FRAME_MAX: u32 = 131_072;
/// AMQP's smallest frame_max: every peer must take frames this large.
const FRAME_MIN: u32 = 4096;
/// How long connecting (TCP, TLS, AMQP handshake) to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// What went wrong talking to the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WireError {
    /// The URL is not an AMQP URL, or asks for what this client does not do.
    #[error("{0}")]
    Url(String),
    /// Connecting, reading or writing failed.
    #[error("{0}")]
    Io(String),
    /// No answer in time while connecting.
    #[error("no answer in {0:?}")]
    Timeout(Duration),
    /// The broker closed the connection (a refused login, a forced close…).
    #[error("the broker closed the connection: {text} ({code})")]
    ConnectionClosed {
        /// The AMQP reply code.
        code: u16,
        /// The broker's reason.
        text: String,
    },
    /// The broker closed a channel: its reason (`NOT_FOUND - no queue…`).
    #[error("{text}")]
    ChannelClosed {
        /// The AMQP reply code (404, 403, 406…).
        code: u16,
        /// The broker's reason.
        text: String,
    },
    /// The connection went away (I/O error, missed heartbeats, closed).
    #[error("the connection was lost: {0}")]
    Lost(String),
    /// The broker sent something this client did not expect.
    #[error("unexpected from the broker: {0}")]
    Protocol(String),
}

impl WireError {
    /// Whether the connection (not just a channel) is gone.
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            Self::Io(_) | Self::Lost(_) | Self::ConnectionClosed { .. }
        )
    }

    /// The channel-level reply code, if the broker closed a channel.
    pub fn channel_code(&self) -> Option<u16> {
        match self {
            Self::ChannelClosed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}

/// Runs a cookie-factory serializer into a new buffer.
fn serialize<'a>(f: impl SerializeFn<Vec<u8>> + 'a) -> Vec<u8> {
    // Writing to a Vec cannot fail.
    f(Vec::new().into())
        .map(|ctx| ctx.write)
        .unwrap_or_default()
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 8);
    f.push(kind);
    f.extend_from_slice(&channel.to_be_bytes());
    // Payloads are bounded by frame_max (a u32) by construction.
    f.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    f
}

fn method_frame(channel: u16, class: &AMQPClass) -> Vec<u8> {
    frame(
        FRAME_METHOD,
        channel,
        &serialize(lapin::protocol::gen_class(class)),
    )
}

fn short(s: &str) -> ShortString {
    ShortString::from(s.to_owned())
}

/// One frame: type, channel, payload (the frame end checked and dropped).
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: u32,
) -> Result<(u8, u16, Vec<u8>), WireError> {
    let mut head = [0u8; 7];
    r.read_exact(&mut head).await?;
    if &head[..4] == b"AMQP" {
        return Err(WireError::Protocol(
            "the broker does not speak AMQP 0-9-1".into(),
        ));
    }
    let channel = u16::from_be_bytes([head[1], head[2]]);
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    if size > max.max(FRAME_MAX) {
        return Err(WireError::Protocol(format!(
            "a frame of {size} bytes, over frame_max {max}"
        )));
    }
    let mut payload = vec![0u8; size as usize + 1];
    r.read_exact(&mut payload).await?;
    if payload.pop() != Some(FRAME_END) {
        return Err(WireError::Protocol("a frame without its frame-end".into()));
    }
    Ok((head[0], channel, payload))
}

fn parse_method(payload: &[u8]) -> Result<AMQPClass, WireError> {
    match lapin::protocol::parse_class(payload) {
        Ok((_, class)) => Ok(class),
        Err(e) => Err(WireError::Protocol(format!("a method frame: {e}"))),
    }
}

/// `basic.get-ok`, read by hand: its exchange and routing key are short strings
/// that the publisher chose, and need not be UTF-8 either.
#[derive(Debug)]
struct GetOk {
    delivery_tag: u64,
}

fn parse_get_ok(payload: &[u8]) -> Option<GetOk> {
    // class 60, method 71, delivery-tag, redelivered, exchange, routing-key, count.
    if payload.get(..4)? != [0, 60, 0, 71] {
        return None;
    }
    let tag = u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?);
    // Then the redelivered bit, exchange, routing key and message count.
    Some(GetOk { delivery_tag: tag })
}

fn is_method(payload: &[u8], class: u16, method: u16) -> bool {
    payload.len() >= 4
        && u16::from_be_bytes([payload[0], payload[1]]) == class
        && u16::from_be_bytes([payload[2], payload[3]]) == method
}

/// A property of the `basic` class: its flag bit and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Short,
    Table,
    Octet,
    Timestamp,
}

/// The `basic` properties in wire order: name, flag bit, kind.
const PROPERTIES: [(&str, u16, Kind); 14] = [
    ("content_type", 15, Kind::Short),
    ("content_encoding", 14, Kind::Short),
    ("headers", 13, Kind::Table),
    ("delivery_mode", 12, Kind::Octet),
    ("priority", 11, Kind::Octet),
    ("correlation_id", 10, Kind::Short),
    ("reply_to", 9, Kind::Short),
    ("expiration", 8, Kind::Short),
    ("message_id", 7, Kind::Short),
    ("timestamp", 6, Kind::Timestamp),
    ("type", 5, Kind::Short),
    ("user_id", 4, Kind::Short),
    ("app_id", 3, Kind::Short),
    ("cluster_id", 2, Kind::Short),
];

/// A property whose bytes an AMQP client library cannot decode: a short string
/// that is not UTF-8, or a header table with such a key (or value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// `message_id`, `type`, `headers`…
    pub field: &'static str,
    /// Its bytes as sent (a table without its length prefix).
    pub raw: Vec<u8>,
}

/// A message's properties as the bytes of its content header: each present
/// property with its encoding (length prefix included), in wire order. Decoded
/// for display with [`RawProperties::decode`]; republished as they are, or with
/// new headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawProperties {
    fields: Vec<(u16, Vec<u8>)>,
}

impl RawProperties {
    /// Splits the property section of a content header (flags, then values).
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let bad = || WireError::Protocol("a truncated content header".into());
        let slice = |at: usize, n: usize| {
            at.checked_add(n)
                .and_then(|end| bytes.get(at..end))
                .ok_or_else(bad)
        };
        let first = slice(0, 2)?;
        let flags = u16::from_be_bytes([first[0], first[1]]);
        let mut at = 2;
        // Further flag words (bit 0 set) carry no basic property.
        let mut more = flags & 1 == 1;
        while more {
            more = slice(at, 2)?[1] & 1 == 1;
            at += 2;
        }
        let mut fields = Vec::new();
        for (_, bit, kind) in PROPERTIES {
            if flags & (1 << bit) == 0 {
                continue;
            }
            let len = match kind {
                Kind::Short => 1 + usize::from(slice(at, 1)?[0]),
                Kind::Table => {
                    let l = slice(at, 4)?;
                    4 + u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize
                }
                Kind::Octet => 1,
                Kind::Timestamp => 8,
            };
            fields.push((bit, slice(at, len)?.to_vec()));
            at += len;
        }
        Ok(Self { fields })
    }

    /// Encodes `props` (whose strings are UTF-8 by construction).
    pub fn from_properties(props: &BasicProperties) -> Self {
        let header = serialize(lapin::protocol::basic::gen_properties(props));
        // gen_properties writes the flags and the values, as parse reads them.
        Self::parse(&header).unwrap_or_default()
    }

    /// The property section: flags, then the values.
    pub fn encode(&self) -> Vec<u8> {
        let flags = self.fields.iter().fold(0u16, |f, (bit, _)| f | (1 << bit));
        let mut out = flags.to_be_bytes().to_vec();
        for (_, value) in &self.fields {
            out.extend_from_slice(value);
        }
        out
    }

    fn set(&mut self, bit: u16, value: Vec<u8>) {
        match self.fields.iter_mut().find(|(b, _)| *b == bit) {
            Some(field) => field.1 = value,
            None => {
                self.fields.push((bit, value));
                // Wire order: highest bit first.
                self.fields.sort_by_key(|f| std::cmp::Reverse(f.0));
            }
        }
    }

    /// The same properties with `headers` instead.
    pub fn with_headers(mut self, headers: &FieldTable) -> Self {
        self.set(13, serialize(gen_field_table(headers)));
        self
    }

    /// The same properties with this delivery mode (2: persistent).
    pub fn with_delivery_mode(mut self, mode: u8) -> Self {
        self.set(12, vec![mode]);
        self
    }

    /// The properties as lapin holds them, with the bytes of each short string
    /// that is not UTF-8 replaced (U+FFFD) and a header table that cannot be
    /// decoded left out; those are listed as [`Unreadable`].
    pub fn decode(&self) -> (BasicProperties, Vec<Unreadable>) {
        let mut p = BasicProperties::default();
        let mut unreadable = Vec::new();
        for (bit, value) in &self.fields {
            let Some((name, _, kind)) = PROPERTIES.iter().find(|(_, b, _)| b == bit) else {
                continue;
            };
            match kind {
                Kind::Short => {
                    let bytes = &value[1..];
                    let text = match std::str::from_utf8(bytes) {
                        Ok(s) => short(s),
                        Err(_) => {
                            unreadable.push(Unreadable {
                                field: name,
                                raw: bytes.to_vec(),
                            });
                            ShortString::from(String::from_utf8_lossy(bytes).into_owned())
                        }
                    };
                    p = match *bit {
                        15 => p.with_content_type(text),
                        14 => p.with_content_encoding(text),
                        10 => p.with_correlation_id(text),
                        9 => p.with_reply_to(text),
                        8 => p.with_expiration(text),
                        7 => p.with_message_id(text),
                        5 => p.with_type(text),
                        4 => p.with_user_id(text),
                        3 => p.with_app_id(text),
                        _ => p.with_cluster_id(text),
                    };
                }
                Kind::Table => match parse_field_table(value.as_slice()) {
                    Ok(([], table)) => p = p.with_headers(table),
                    _ => unreadable.push(Unreadable {
                        field: name,
                        raw: value[4..].to_vec(),
                    }),
                },
                Kind::Octet if *bit == 12 => p = p.with_delivery_mode(value[0]),
                Kind::Octet => p = p.with_priority(value[0]),
                Kind::Timestamp => {
                    let t = u64::from_be_bytes(value[..8].try_into().unwrap_or_default());
                    p = p.with_timestamp(t);
                }
            }
        }
        (p, unreadable)
    }
}

/// A message taken with `basic.get`, unacked.
#[derive(Debug)]
pub(super) struct Got {
    /// Its delivery tag on the channel that took it.
    pub(super) delivery_tag: u64,
    /// Its properties, as sent.
    pub(super) properties: RawProperties,
    /// Its body.
    pub(super) body: Vec<u8>,
}

/// What the broker did with a confirmed publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Published {
    /// Taken by a queue.
    Confirmed,
    /// No queue took it (mandatory): the broker's reason.
    Returned(String),
    /// The broker refused it (`basic.nack`): it is in no queue.
    Nacked,
}

/// A frame for a channel, as read.
#[derive(Debug)]
enum Frame {
    Method(Vec<u8>),
    Header(Vec<u8>),
    Body(Vec<u8>),
}

/// State the I/O tasks share with the channels.
#[derive(Debug, Default)]
struct Shared {
    /// Cancelled once the connection is gone.
    lost: CancellationToken,
    /// Why.
    reason: Mutex<Option<WireError>>,
    /// Where each open channel's frames go.
    routes: Mutex<HashMap<u16, mpsc::UnboundedSender<Frame>>>,
    /// The broker answered our `connection.close`.
    closed: CancellationToken,
}

impl Shared {
    fn fail(&self, error: WireError) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(error);
        }
        self.lost.cancel();
        if let Ok(mut routes) = self.routes.lock() {
            routes.clear();
        }
    }

    fn reason(&self) -> WireError {
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| WireError::Lost("closed".into()))
    }
}

/// One AMQP connection, with a reader and a writer task (heartbeats included).
/// Dropping it drops the socket: the broker requeues what it held unacked.
#[derive(Debug)]
pub(super) struct Wire {
    out: mpsc::UnboundedSender<Vec<u8>>,
    shared: Arc<Shared>,
    frame_max: u32,
    channel_max: u16,
    next_channel: u16,
    /// The broker's `product` and `version` server properties.
    pub(super) server: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Wire {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The handshake's result, before the I/O tasks start.
struct Tuned {
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    server: String,
}

impl Wire {
    /// Connects to the first of `urls` (comma-separated, as txq's `amqp_url`) that
    /// answers; `name` shows in the management UI.
    pub(super) async fn connect(urls: &[String], name: &str) -> Result<Self, WireError> {
        let mut last = WireError::Url("no AMQP URL".into());
        for url in urls {
            match tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_one(url, name)).await {
                Ok(Ok(wire)) => return Ok(wire),
                Ok(Err(e)) => last = e,
                Err(_) => last = WireError::Timeout(CONNECT_TIMEOUT),
            }
            if urls.len() > 1 {
                tracing::warn!(error = %last, "rabbitmq node did not accept the connection; trying the next");
            }
        }
        Err(last)
    }

    async fn connect_one(url: &str, name: &str) -> Result<Self, WireError> {
        use lapin::tcp::AMQPUriTcpExt as _;
        let uri: AMQPUri = url.parse().map_err(WireError::Url)?;
        let runtime =
            lapin::runtime::default_runtime().map_err(|e| WireError::Io(e.to_string()))?;
        let mut stream = uri
            .connect_with_config_async(lapin::tcp::TLSConfig::default(), &runtime)
            .await?;
        let tuned = handshake(&mut stream, &uri, name).await?;
        let (reader, writer) = stream.split();
        let (out, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let tasks = vec![
            tokio::spawn(write_loop(writer, rx, tuned.heartbeat, shared.clone())),
            tokio::spawn(read_loop(
                reader,
                out.clone(),
                tuned.heartbeat,
                tuned.frame_max,
                shared.clone(),
            )),
        ];
        Ok(Self {
            out,
            shared,
            frame_max: tuned.frame_max,
            channel_max: tuned.channel_max,
            next_channel: 1,
            server: tuned.server,
            tasks,
        })
    }

    /// Whether the connection is gone.
    pub(super) fn is_lost(&self) -> bool {
        self.shared.lost.is_cancelled()
    }

    /// Opens a new channel.
    pub(super) async fn channel(&mut self) -> Result<Chan, WireError> {
        let id = self.next_channel;
        if id == 0 || id > self.channel_max {
            return Err(WireError::Protocol("out of channels".into()));
        }
        self.next_channel += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .routes
            .lock()
            .map_err(|_| WireError::Lost("poisoned".into()))?
            .insert(id, tx);
        let mut chan = Chan {
            id,
            out: self.out.clone(),
            rx,
            shared: self.shared.clone(),
            frame_max: self.frame_max,
            published: 0,
            closed: false,
        };
        let open = AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}));
        match chan.rpc(open).await? {
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(chan),
            other => Err(unexpected("channel.open-ok", &other)),
        }
    }

    /// Closes the connection: the broker requeues anything still unacked, and
    /// answers once it has handled everything sent before.
    pub(super) async fn close(self) {
        if self.is_lost() {
            return;
        }
        let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: short("txq dlq done"),
            class_id: 0,
            method_id: 0,
        }));
        if self.out.send(method_frame(0, &close)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                tokio::select! {
                    _ = self.shared.closed.cancelled() => {}
                    _ = self.shared.lost.cancelled() => {}
                }
            })
            .await;
        }
    }
}

fn unexpected(wanted: &str, got: &AMQPClass) -> WireError {
    WireError::Protocol(format!("wanted {wanted}, got {got:?}"))
}

async fn send_raw<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), WireError> {
    w.write_all(bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Reads the next method on channel 0 during the handshake.
async fn handshake_method<R: AsyncRead + Unpin>(r: &mut R) -> Result<AMQPClass, WireError> {
    loop {
        let (kind, _, payload) = read_frame(r, FRAME_MAX).await?;
        match kind {
            FRAME_HEARTBEAT => continue,
            FRAME_METHOD => {
                return match parse_method(&payload)? {
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                        Err(WireError::ConnectionClosed {
                            code: c.reply_code,
                            text: c.reply_text.to_string(),
                        })
                    }
                    m => Ok(m),
                };
            }
            _ => {
                return Err(WireError::Protocol(
                    "a content frame in the handshake".into(),
                ));
            }
        }
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    uri: &AMQPUri,
    name: &str,
) -> Result<Tuned, WireError> {
    send_raw(s, b"AMQP\x00\x00\x09\x01").await?;
    let start = match handshake_method(s).await {
        Ok(AMQPClass::Connection(connection::AMQPMethod::Start(start))) => start,
        Ok(other) => return Err(unexpected("connection.start", &other)),
        // A broker that refuses the protocol answers with its own header and
        // closes; a closed socket reads as EOF.
        Err(e) => return Err(e),
    };
    let server = {
        let p = start.server_properties.inner();
        let get = |k: &str| {
            p.get(k)
                .and_then(crate::broker::header_text)
                .unwrap_or_default()
        };
        format!("{} {}", get("product"), get("version"))
    };
    let mechanism = uri.query.auth_mechanism.unwrap_or_default();
    let user = &uri.authority.userinfo;
    let response: Vec<u8> = match mechanism {
        SASLMechanism::Plain => format!("\0{}\0{}", user.username, user.password).into_bytes(),
        SASLMechanism::AMQPlain => {
            let mut t = FieldTable::default();
            t.insert(
                "LOGIN".into(),
                AMQPValue::LongString(user.username.as_str().into()),
            );
            t.insert(
                "PASSWORD".into(),
                AMQPValue::LongString(user.password.as_str().into()),
            );
            // A table without its length prefix.
            serialize(gen_field_table(&t)).split_off(4)
        }
        SASLMechanism::External | SASLMechanism::Anonymous => Vec::new(),
        SASLMechanism::RabbitCrDemo => {
            return Err(WireError::Url(
                "auth_mechanism RABBIT-CR-DEMO is not supported by txq dlq".into(),
            ));
        }
    };
    let mut capabilities = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "connection.blocked",
        "authentication_failure_close",
    ] {
        capabilities.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut client = FieldTable::default();
    client.insert("product".into(), AMQPValue::LongString("txq".into()));
    client.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    client.insert("connection_name".into(), AMQPValue::LongString(name.into()));
    client.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let start_ok = AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
        client_properties: client,
        mechanism: short(mechanism.name()),
        response: LongString::from(response),
        locale: short("en_US"),
    }));
    send_raw(s, &method_frame(0, &start_ok)).await?;
    let tune = match handshake_method(s).await? {
        AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
        AMQPClass::Connection(connection::AMQPMethod::Secure(_)) => {
            return Err(WireError::Url(format!(
                "the broker asks for a SASL challenge, which {} does not take here",
                mechanism.name()
            )));
        }
        other => return Err(unexpected("connection.tune", &other)),
    };
    let pick = |ours: Option<u32>, theirs: u32| match (ours, theirs) {
        (Some(o), 0) => o,
        (Some(o), t) => o.min(t),
        (None, t) => t,
    };
    let frame_max = pick(uri.query.frame_max, tune.frame_max);
    let frame_max = if frame_max == 0 {
        FRAME_MAX
    } else {
        frame_max.max(FRAME_MIN)
    };
    let channel_max = match pick(
        uri.query.channel_max.map(u32::from),
        u32::from(tune.channel_max),
    ) {
        0 => u16::MAX,
        n => u16::try_from(n).unwrap_or(u16::MAX),
    };
    let heartbeat = uri.query.heartbeat.unwrap_or(tune.heartbeat);
    let tune_ok = AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
        channel_max,
        frame_max,
        heartbeat,
    }));
    send_raw(s, &method_frame(0, &tune_ok)).await?;
    let open = AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
        virtual_host: short(&uri.vhost),
    }));
    send_raw(s, &method_frame(0, &open)).await?;
    match handshake_method(s).await? {
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
        other => return Err(unexpected("connection.open-ok", &other)),
    }
    Ok(Tuned {
        frame_max,
        channel_max,
        heartbeat,
        server,
    })
}

/// Writes queued frames; sends a heartbeat every half interval.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    heartbeat: u16,
    shared: Arc<Shared>,
) {
    let period = Duration::from_millis(u64::from(heartbeat.max(1)) * 500);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let bytes = tokio::select! {
            _ = shared.lost.cancelled() => return,
            next = rx.recv() => match next {
                Some(bytes) => bytes,
                None => return,
            },
            _ = tick.tick(), if heartbeat > 0 => frame(FRAME_HEARTBEAT, 0, &[]),
        };
        if let Err(e) = send_raw(&mut w, &bytes).await {
            shared.fail(WireError::Lost(e.to_string()));
            return;
        }
    }
}

/// Reads frames and hands each to its channel; answers the broker's
/// `connection.close`; gives up after two heartbeat intervals of silence.
async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    out: mpsc::UnboundedSender<Vec<u8>>,
    heartbeat: u16,
    frame_max: u32,
    shared: Arc<Shared>,
) {
    let silence = Duration::from_secs(u64::from(heartbeat) * 2);
    loop {
        let next = if heartbeat > 0 {
            match tokio::time::timeout(silence, read_frame(&mut r, frame_max)).await {
                Ok(next) => next,
                Err(_) => Err(WireError::Lost(format!(
                    "no heartbeat from the broker in {silence:?}"
                ))),
            }
        } else {
            read_frame(&mut r, frame_max).await
        };
        let (kind, channel, payload) = match next {
            Ok(f) => f,
            Err(e) => {
                let e = match e {
                    WireError::Io(text) => WireError::Lost(text),
                    other => other,
                };
                shared.fail(e);
                return;
            }
        };
        if channel == 0 {
            if kind != FRAME_METHOD {
                continue;
            }
            match parse_method(&payload) {
                Ok(AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                    tracing::warn!(code = c.reply_code, reason = %c.reply_text, "rabbitmq closed the connection");
                    let ok = AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                        connection::CloseOk {},
                    ));
                    let _ = out.send(method_frame(0, &ok));
                    shared.fail(WireError::ConnectionClosed {
                        code: c.reply_code,
                        text: c.reply_text.to_string(),
                    });
                    return;
                }
                Ok(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                    shared.closed.cancel();
                    shared.fail(WireError::Lost("closed".into()));
                    return;
                }
                Ok(AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) => {
                    tracing::warn!(reason = %b.reason, "rabbitmq blocked the connection (resource alarm): publishing waits");
                }
                Ok(_) => {}
                Err(e) => {
                    shared.fail(e);
                    return;
                }
            }
            continue;
        }
        let frame = match kind {
            FRAME_METHOD => Frame::Method(payload),
            FRAME_HEADER => Frame::Header(payload),
            FRAME_BODY => Frame::Body(payload),
            _ => continue,
        };
        let route = shared
            .routes
            .lock()
            .ok()
            .and_then(|routes| routes.get(&channel).cloned());
        if let Some(route) = route {
            let _ = route.send(frame);
        }
    }
}

/// One channel. Its methods wait for the broker's answer; a channel the broker
/// closed answers every later call with that error.
#[derive(Debug)]
pub(super) struct Chan {
    id: u16,
    out: mpsc::UnboundedSender<Vec<u8>>,
    rx: mpsc::UnboundedReceiver<Frame>,
    shared: Arc<Shared>,
    frame_max: u32,
    /// Publishes so far (in confirm mode: the sequence number of the last).
    published: u64,
    closed: bool,
}

impl Drop for Chan {
    fn drop(&mut self) {
        if let Ok(mut routes) = self.shared.routes.lock() {
            routes.remove(&self.id);
        }
    }
}

impl Chan {
    fn send(&self, bytes: Vec<u8>) -> Result<(), WireError> {
        if self.shared.lost.is_cancelled() {
            return Err(self.shared.reason());
        }
        self.out.send(bytes).map_err(|_| self.shared.reason())
    }

    fn send_method(&self, class: &AMQPClass) -> Result<(), WireError> {
        self.send(method_frame(self.id, class))
    }

    async fn recv(&mut self) -> Result<Frame, WireError> {
        tokio::select! {
            biased;
            f = self.rx.recv() => f.ok_or_else(|| self.shared.reason()),
            _ = self.shared.lost.cancelled() => Err(self.shared.reason()),
        }
    }

    /// The next method; a `channel.close` from the broker is answered and
    /// returned as [`WireError::ChannelClosed`].
    async fn recv_method(&mut self) -> Result<Vec<u8>, WireError> {
        loop {
            match self.recv().await? {
                Frame::Method(payload) if is_method(&payload, 20, 40) => {
                    let (code, text) = match parse_method(&payload) {
                        Ok(AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                            (c.reply_code, c.reply_text.to_string())
                        }
                        _ => (0, "closed".into()),
                    };
                    self.closed = true;
                    let ok = AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}));
                    let _ = self.send_method(&ok);
                    return Err(WireError::ChannelClosed { code, text });
                }
                Frame::Method(payload) => return Ok(payload),
                // Content of a returned message nobody waits for.
                Frame::Header(_) | Frame::Body(_) => continue,
            }
        }
    }

    async fn rpc(&mut self, class: AMQPClass) -> Result<AMQPClass, WireError> {
        self.send_method(&class)?;
        parse_method(&self.recv_method().await?)
    }

    /// `queue.declare`: the queue's ready messages. Passive only checks that it
    /// exists; otherwise the broker also checks that it has these properties and
    /// arguments (a mismatch closes the channel: 406).
    pub(super) async fn declare(
        &mut self,
        queue: &str,
        passive: bool,
        arguments: FieldTable,
    ) -> Result<u32, WireError> {
        let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: short(queue),
            passive,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments,
        }));
        match self.rpc(declare).await? {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok.message_count),
            other => Err(unexpected("queue.declare-ok", &other)),
        }
    }

    /// `basic.get` without auto-ack: the next message, held unacked, or `None`.
    pub(super) async fn get(&mut self, queue: &str) -> Result<Option<Got>, WireError> {
        let get = AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: short(queue),
            no_ack: false,
        }));
        self.send_method(&get)?;
        let payload = self.recv_method().await?;
        if is_method(&payload, 60, 72) {
            return Ok(None);
        }
        let ok = parse_get_ok(&payload)
            .ok_or_else(|| WireError::Protocol("wanted basic.get-ok or basic.get-empty".into()))?;
        let (properties, body) = self.content().await?;
        Ok(Some(Got {
            delivery_tag: ok.delivery_tag,
            properties,
            body,
        }))
    }

    /// The content header and body frames after a get-ok or a return.
    async fn content(&mut self) -> Result<(RawProperties, Vec<u8>), WireError> {
        let header = match self.recv().await? {
            Frame::Header(h) => h,
            _ => return Err(WireError::Protocol("wanted a content header".into())),
        };
        let size = header
            .get(4..12)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| WireError::Protocol("a truncated content header".into()))?;
        let properties = RawProperties::parse(&header[12..])?;
        let size = usize::try_from(size)
            .map_err(|_| WireError::Protocol("a body larger than memory".into()))?;
        let mut body = Vec::with_capacity(size.min(64 * 1024 * 1024));
        while body.len() < size {
            match self.recv().await? {
                Frame::Body(b) => body.extend_from_slice(&b),
                _ => return Err(WireError::Protocol("wanted a body frame".into())),
            }
        }
        Ok((properties, body))
    }

    /// Acks one delivery (no answer comes back).
    pub(super) fn ack(&self, delivery_tag: u64) -> Result<(), WireError> {
        self.send_method(&AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple: false,
        })))
    }

    /// Nacks a delivery, or every unsettled one up to it (`multiple`).
    pub(super) fn nack(
        &self,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), WireError> {
        self.send_method(&AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag,
            multiple,
            requeue,
        })))
    }

    /// Puts the channel in confirm mode.
    pub(super) async fn confirm_select(&mut self) -> Result<(), WireError> {
        let select = AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        }));
        match self.rpc(select).await? {
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => Ok(()),
            other => Err(unexpected("confirm.select-ok", &other)),
        }
    }

    /// Publishes to `queue` through the default exchange, mandatory, and waits for
    /// the broker's confirm (the channel must be in confirm mode).
    pub(super) async fn publish(
        &mut self,
        queue: &str,
        properties: &RawProperties,
        body: &[u8],
    ) -> Result<Published, WireError> {
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: short(""),
            routing_key: short(queue),
            mandatory: true,
            immediate: false,
        }));
        let mut header = Vec::new();
        header.extend_from_slice(&60u16.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&properties.encode());
        if header.len() + 8 > self.frame_max as usize {
            return Err(WireError::Protocol(format!(
                "properties of {} bytes do not fit in a frame ({} bytes)",
                header.len(),
                self.frame_max
            )));
        }
        let mut bytes = method_frame(self.id, &publish);
        bytes.extend(frame(FRAME_HEADER, self.id, &header));
        let chunk = (self.frame_max as usize).saturating_sub(8).max(1);
        for part in body.chunks(chunk) {
            bytes.extend(frame(FRAME_BODY, self.id, part));
        }
        // One write: the frames of one message are never interleaved.
        self.send(bytes)?;
        self.published += 1;
        let seq = self.published;
        let mut returned = None;
        loop {
            let payload = self.recv_method().await?;
            if is_method(&payload, 60, 50) {
                // basic.return: the message follows; its reply text is ASCII.
                let text = match parse_method(&payload) {
                    Ok(AMQPClass::Basic(basic::AMQPMethod::Return(r))) => {
                        format!("{} {}", r.reply_code, r.reply_text)
                    }
                    _ => "returned".into(),
                };
                self.content().await?;
                returned = Some(text);
                continue;
            }
            match parse_method(&payload)? {
                AMQPClass::Basic(basic::AMQPMethod::Ack(a))
                    if a.delivery_tag == seq || (a.multiple && a.delivery_tag >= seq) =>
                {
                    return Ok(returned.map_or(Published::Confirmed, Published::Returned));
                }
                AMQPClass::Basic(basic::AMQPMethod::Nack(n))
                    if n.delivery_tag == seq || (n.multiple && n.delivery_tag >= seq) =>
                {
                    return Ok(Published::Nacked);
                }
                // A confirm of an earlier publish (none here: one at a time).
                AMQPClass::Basic(basic::AMQPMethod::Ack(_) | basic::AMQPMethod::Nack(_)) => {}
                other => return Err(unexpected("basic.ack", &other)),
            }
        }
    }

    /// Closes the channel; the broker requeues what it holds unacked, after
    /// everything sent on it before.
    pub(super) async fn close(mut self) -> Result<(), WireError> {
        if self.closed {
            return Ok(());
        }
        let close = AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: short("txq dlq done"),
            class_id: 0,
            method_id: 0,
        }));
        match self.rpc(close).await {
            Ok(AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => Ok(()),
            Ok(other) => Err(unexpected("channel.close-ok", &other)),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_and_bytes_that_are_not_utf8_are_kept_and_named() {
        let mut headers = FieldTable::default();
        headers.insert("x-txq-error".into(), AMQPValue::LongString("boom".into()));
        let props = BasicProperties::default()
            .with_message_id("POISON".into())
            .with_type("t".into())
            .with_headers(headers)
            .with_timestamp(7)
            .with_delivery_mode(1);
        let raw = RawProperties::from_properties(&props);
        let (decoded, unreadable) = raw.decode();
        assert_eq!(decoded, props);
        assert!(unreadable.is_empty());

        // The message_id's bytes made invalid, as a client could send them.
        let mut bytes = raw.encode();
        let at = bytes
            .windows(6)
            .position(|w| w == b"POISON")
            .expect("message_id");
        bytes[at..at + 6].copy_from_slice(&[0xFF; 6]);
        let poisoned = RawProperties::parse(&bytes).expect("parsed");
        assert_eq!(poisoned.encode(), bytes, "kept byte for byte");
        let (decoded, unreadable) = poisoned.decode();
        assert_eq!(
            unreadable,
            [Unreadable {
                field: "message_id",
                raw: vec![0xFF; 6]
            }]
        );
        assert_eq!(
            decoded.message_id().as_ref().map(|m| m.as_str().to_owned()),
            Some("\u{FFFD}".repeat(6))
        );
        assert_eq!(decoded.kind().as_ref().map(|k| k.as_str()), Some("t"));
        assert_eq!(*decoded.timestamp(), Some(7));

        // New headers and mode; the unreadable message_id goes along unchanged.
        let mut replayed = FieldTable::default();
        replayed.insert("x-txq-replayed".into(), AMQPValue::LongLongInt(1));
        let copy = poisoned.with_headers(&replayed).with_delivery_mode(2);
        let (decoded, unreadable) = copy.decode();
        assert_eq!(decoded.headers().as_ref(), Some(&replayed));
        assert_eq!(*decoded.delivery_mode(), Some(2));
        assert_eq!(unreadable.len(), 1);
        assert!(copy.encode().windows(6).any(|w| w == [0xFF; 6]));
    }

    #[test]
    fn a_header_key_that_is_not_utf8_leaves_the_table_unreadable_not_the_rest() {
        let mut headers = FieldTable::default();
        headers.insert("KEYKEY".into(), AMQPValue::LongLongInt(1));
        let props = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(headers);
        let mut bytes = RawProperties::from_properties(&props).encode();
        let at = bytes.windows(6).position(|w| w == b"KEYKEY").expect("key");
        bytes[at] = 0xC0;
        let raw = RawProperties::parse(&bytes).expect("parsed");
        let (decoded, unreadable) = raw.decode();
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable[0].field, "headers");
        assert_eq!(decoded.headers(), &None);
        assert_eq!(decoded.message_id().as_ref().map(|m| m.as_str()), Some("m"));
        assert_eq!(raw.encode(), bytes);
    }

    #[test]
    fn truncated_headers_are_an_error_not_a_panic() {
        let props = BasicProperties::default().with_message_id("abc".into());
        let bytes = RawProperties::from_properties(&props).encode();
        for cut in 0..bytes.len() {
            assert!(RawProperties::parse(&bytes[..cut]).is_err(), "{cut}");
        }
    }

    #[test]
    fn get_ok_with_a_routing_key_that_is_not_utf8_is_read() {
        let mut p = vec![0, 60, 0, 71];
        p.extend_from_slice(&9u64.to_be_bytes());
        p.push(1);
        p.extend_from_slice(&[0]);
        p.extend_from_slice(&[2, 0xFF, 0xFE]);
        p.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(parse_get_ok(&p).expect("get-ok").delivery_tag, 9);
    }
}
