//! The entropy device (virtio ID 4), `--rng`: fills every buffer the Guest
//! offers from the kernel's random source.

use crate::virtio::{Device, DeviceError, Queues};

pub struct Rng;

impl Device for Rng {
    fn name(&self) -> &'static str {
        "rng"
    }
    fn virtio_id(&self) -> u8 {
        lguest_abi::VIRTIO_ID_RNG
    }
    fn queue_names(&self) -> &'static [&'static str] {
        &["requests"]
    }
    fn features(&self) -> u32 {
        0
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn kick(&mut self, q: usize, queues: &mut Queues) -> Result<(), DeviceError> {
        let mut chunk = [0u8; 4096];
        while let Some(chain) = queues.pop(q)? {
            let mut len = 0u32;
            for b in chain.writable() {
                // In pieces: the Guest's buffer lengths are its own choice.
                let mut done = 0u64;
                while done < b.len as u64 {
                    let n = (b.len as u64 - done).min(chunk.len() as u64) as usize;
                    fill_random(&mut chunk[..n]);
                    queues
                        .mem
                        .write(b.addr + done, &chunk[..n])
                        .expect("checked by the walk");
                    done += n as u64;
                }
                len = len.saturating_add(b.len);
            }
            queues.push(q, &chain, len)?;
        }
        Ok(())
    }
}

fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most rest.len() bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            done += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // The kernel's source is always there on Linux >= 3.17; if it
            // is not, the Guest gets zeros rather than a hung device.
            return;
        }
    }
}
