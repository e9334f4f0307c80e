//! The demo's NBD client against a real server (qemu-nbd from qemu-utils).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tandem_tools::nbd_client::NbdClient;

#[test]
fn nbd_client_round_trips_through_qemu_nbd() {
    let dir = std::env::temp_dir().join(format!("tandem-nbdc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
        ])
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd (package qemu-utils) must be installed");
    let address = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let mut client = loop {
        match NbdClient::connect(&address, Duration::from_secs(2)) {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect to qemu-nbd: {e}"),
        }
    };
    assert_eq!(client.size(), 4 << 20);
    let block: Vec<u8> = (0..4096u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    client.write(8192, &block, true).unwrap();
    client.flush().unwrap();
    assert_eq!(client.read(8192, 4096).unwrap(), block);
    assert_eq!(client.read(0, 4096).unwrap(), vec![0u8; 4096]);
    drop(client);
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(&on_disk[8192..8192 + 4096], &block[..]);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
