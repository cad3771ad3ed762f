//! End-to-end tests of the shm transport: the handshake, hello and calls between two real
//! processes, a killed peer, and futex wake-ups under load between threads.
//!
//! The second process is this test binary itself, started with `IDM_SHM_TEST_ROLE` set and
//! told to run only [`child_entry`], which plays the role named there.

use idm_core::wire::proto::ErrorKind;
use idm_core::{idm_messages, BulkRef, ChannelError, Client, Message, MessageId, NotifyError};
use idm_core::{Server, WaitPolicy};
use idm_shm::{connect, ChannelLayout, ServerLimits, ShmEndpoint, ShmListener, ShmServer, ShmWindow};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const ROLE: &str = "IDM_SHM_TEST_ROLE";
const SOCKET: &str = "IDM_SHM_TEST_SOCKET";
const MAX_FRAME: u32 = 4096;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Add {
    a: u32,
    b: u32,
}
impl Message for Add {
    const ID: MessageId = MessageId(0x0100);
}
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sum(u64);
impl Message for Sum {
    const ID: MessageId = MessageId(0x0101);
}
/// Sum of the bytes a descriptor points at in the data window.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct ByteSum(BulkRef);
impl Message for ByteSum {
    const ID: MessageId = MessageId(0x0102);
}
idm_messages! { enum Req { Add(Add), ByteSum(ByteSum) } }

fn socket_path(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("idm-shm-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn spawn_child(role: &str, path: &PathBuf) -> Child {
    Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(SOCKET, path)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the child test process")
}

/// Serves `Req`s until the client hangs up; returns how the loop ended and the count.
fn serve(server: &mut ShmServer, window: &ShmWindow) -> (ChannelError, u32) {
    let mut buf = vec![0u8; MAX_FRAME as usize];
    let mut scratch = vec![0u8; MAX_FRAME as usize];
    let mut served = 0;
    loop {
        let req = match server.recv(&mut buf) {
            Ok(r) => r,
            Err(e) => return (e, served),
        };
        let r = match Req::decode(req.id, req.body) {
            Ok(Req::Add(Add { a, b })) => server.reply(&req, &Sum(u64::from(a) + u64::from(b)), &mut scratch),
            Ok(Req::ByteSum(ByteSum(desc))) => {
                let mut data = vec![0u8; desc.len.min(1 << 20) as usize];
                match window.read(desc, &mut data) {
                    Ok(()) => {
                        let s = data.iter().map(|&b| u64::from(b)).sum();
                        server.reply(&req, &Sum(s), &mut scratch)
                    }
                    Err(_) => server.reply_error(&req, ErrorKind::Application, 1, &mut scratch),
                }
            }
            Ok(Req::Unknown(_)) => server.reply_error(&req, ErrorKind::UnknownMessage, 0, &mut scratch),
            Err(_) => server.reply_error(&req, ErrorKind::BadBody, 0, &mut scratch),
        };
        if let Err(e) = r {
            return (e, served);
        }
        served += 1;
    }
}

#[test]
fn two_processes_hello_calls_and_data_window() {
    let path = socket_path("calls");
    let listener = ShmListener::bind(&path, ServerLimits::default()).unwrap();
    let mut child = spawn_child("client", &path);
    let ep = listener.accept(WaitPolicy::default()).expect("handshake");
    assert_eq!(ep.peer.pid, child.id() as i32, "SO_PEERCRED names the child");
    let ShmEndpoint { channel, window, .. } = ep;
    let mut buf = vec![0u8; MAX_FRAME as usize];
    let mut server = Server::accept(channel, MAX_FRAME, &mut buf).expect("hello");
    let (end, served) = serve(&mut server, &window);
    assert_eq!(served, 1001);
    assert_eq!(end, ChannelError::Notify(NotifyError::PeerGone));
    assert!(child.wait().unwrap().success(), "the client's checks failed");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn killed_client_is_detected_as_peer_gone() {
    let path = socket_path("killed");
    let listener = ShmListener::bind(&path, ServerLimits::default()).unwrap();
    let mut child = spawn_child("hang", &path);
    // Block in the futex: no spinning, no timeout; only peer-death detection ends it.
    let blocking = WaitPolicy { spin_iters: 0, timeout: None };
    let ep = listener.accept(blocking).expect("handshake");
    let ShmEndpoint { channel, .. } = ep;
    let mut buf = vec![0u8; MAX_FRAME as usize];
    let server = Server::accept(channel, MAX_FRAME, &mut buf).expect("hello");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut server = server;
        let mut buf = vec![0u8; MAX_FRAME as usize];
        let r = server.recv(&mut buf).map(|_| ());
        let _ = tx.send(r);
    });
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    // A generous hang guard, not a timing assertion: detection takes about 100 ms.
    let r = rx.recv_timeout(Duration::from_secs(30)).expect("server still blocked 30 s after its client was killed");
    assert_eq!(r, Err(ChannelError::Notify(NotifyError::PeerGone)));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn blocking_calls_and_backpressure_between_threads() {
    // Both sides sleep in the futex on every wait: exercises the arm/re-check/wait
    // protocol thousands of times. A lost wake-up would show as a hang (guarded below).
    let path = socket_path("threads");
    let listener = ShmListener::bind(&path, ServerLimits::default()).unwrap();
    let blocking = WaitPolicy { spin_iters: 0, timeout: Some(Duration::from_secs(30)) };
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let ShmEndpoint { channel, window, .. } = listener.accept(blocking).expect("handshake");
            let mut buf = vec![0u8; MAX_FRAME as usize];
            let mut server = Server::accept(channel, MAX_FRAME, &mut buf).expect("hello");
            serve(&mut server, &window)
        });
        let layout = ChannelLayout::new(4096, 1 << 16).unwrap();
        let ep = connect(&path, layout, blocking).unwrap();
        let mut buf = vec![0u8; MAX_FRAME as usize];
        let mut client = Client::connect(ep.channel, MAX_FRAME, &mut buf).unwrap();
        for i in 0..5000u32 {
            let r = client.call(&Add { a: i, b: 1 }, &mut buf).unwrap();
            assert_eq!(r.decode::<Sum>().unwrap(), Sum(u64::from(i) + 1));
        }
        // Asynchronous requests fill the 4 KiB ring many times over.
        for i in 0..20_000u32 {
            client.post(&Add { a: i, b: 0 }, &mut buf).unwrap();
        }
        let r = client.call(&Add { a: 0, b: 0 }, &mut buf).unwrap();
        assert_eq!(r.decode::<Sum>().unwrap(), Sum(0));
        drop(client);
        let (end, served) = server.join().unwrap();
        assert_eq!(served, 5000 + 20_000 + 1);
        assert_eq!(end, ChannelError::Notify(NotifyError::PeerGone));
    });
    let _ = std::fs::remove_file(&path);
}

/// The child's side; does nothing unless started by a test above.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let path = std::env::var(SOCKET).expect("socket path");
    let layout = ChannelLayout::new(8192, 1 << 16).unwrap();
    let ep = connect(&path, layout, WaitPolicy::default()).expect("connect");
    let mut buf = vec![0u8; MAX_FRAME as usize];
    let mut client = Client::connect(ep.channel, MAX_FRAME, &mut buf).expect("hello");
    assert_eq!(client.max_frame(), MAX_FRAME);
    match role.as_str() {
        "client" => {
            for i in 0..1000u32 {
                let r = client.call(&Add { a: i, b: i }, &mut buf).unwrap();
                assert_eq!(r.decode::<Sum>().unwrap(), Sum(2 * u64::from(i)));
            }
            let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
            let desc = BulkRef { offset: 4096, len: data.len() as u64 };
            ep.window.write(desc, &data).unwrap();
            let r = client.call(&ByteSum(desc), &mut buf).unwrap();
            let want: u64 = data.iter().map(|&b| u64::from(b)).sum();
            assert_eq!(r.decode::<Sum>().unwrap(), Sum(want));
        }
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        other => panic!("unknown child role {other}"),
    }
}
