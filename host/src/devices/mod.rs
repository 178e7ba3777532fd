//! Device backends, one module each. What is opened here (disk files, the
//! tap, the terminal) lives as long as the Launcher: a Guest restart gets
//! fresh devices on the same backends.

pub mod block;
pub mod console;
pub mod net;
pub mod rng;
pub mod tap;
pub mod terminal;

use crate::virtio::Device;
use std::sync::Arc;

/// What the command line asked for, opened and checked.
pub struct Backends {
    pub raw_terminal: bool,
    pub disks: Vec<Arc<block::Disk>>,
    /// One network card per `--tunnet`, in order: its tap and MAC.
    pub nets: Vec<(Arc<tap::Tap>, [u8; 6])>,
    pub rng: bool,
}

impl Backends {
    /// The devices for one boot, in bus order: console, disks, net, rng.
    pub fn devices(&self) -> Vec<Box<dyn Device>> {
        let mut devices: Vec<Box<dyn Device>> =
            vec![Box::new(console::Console::new(self.raw_terminal))];
        for (i, disk) in self.disks.iter().enumerate() {
            devices.push(Box::new(block::Block::new(disk.clone(), i)));
        }
        for (tap, mac) in &self.nets {
            devices.push(Box::new(net::Net::new(tap.clone(), *mac)));
        }
        if self.rng {
            devices.push(Box::new(rng::Rng));
        }
        devices
    }
}
