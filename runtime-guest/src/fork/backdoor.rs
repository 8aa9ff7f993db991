//! VMware's backdoor RPC (RPCI) on x86_64: port I/O on the backdoor port,
//! which the hypervisor intercepts, one message at a time over a channel
//! opened per call (the low-bandwidth protocol of open-vm-tools'
//! `lib/message/message.c`).
//!
//! Not tested here: no ESX is available, and on any other hypervisor the
//! port I/O faults. That is why the backend is used only when the config asks
//! for it (`"fork": {"backend": "vmware"}`); the messages it carries are
//! tested in `fork::vmware` against a fake channel.

use std::arch::asm;

const MAGIC: u32 = 0x564D_5868;
const PORT: u32 = 0x5658;
const CMD_MESSAGE: u32 = 0x1e;
/// "RPCI", with the flag that asks for cookies.
const RPCI: u32 = 0x4943_5052 | 0x8000_0000;

const OPEN: u32 = 0;
const SEND_SIZE: u32 = 1;
const SEND_PAYLOAD: u32 = 2;
const RECV_SIZE: u32 = 3;
const RECV_PAYLOAD: u32 = 4;
const RECV_STATUS: u32 = 5;
const CLOSE: u32 = 6;

const STATUS_SUCCESS: u32 = 0x0001;
const STATUS_DORECV: u32 = 0x0002;

/// Largest reply taken.
const MAX_REPLY: u32 = 64 * 1024;

#[derive(Clone, Copy, Default)]
struct Regs {
    ax: u32,
    bx: u32,
    cx: u32,
    dx: u32,
    si: u32,
    di: u32,
}

/// One backdoor call (`in eax, dx` with the magic in eax).
fn call(r: Regs) -> Regs {
    let mut out = r;
    let mut bx = u64::from(r.bx);
    // SAFETY: on VMware the hypervisor intercepts this port and answers in
    // the registers; rbx is saved around the call (LLVM reserves it). This
    // is only reached when the config selected the VMware backend.
    unsafe {
        asm!(
            "xchg rbx, {bx}",
            "in eax, dx",
            "xchg rbx, {bx}",
            bx = inout(reg) bx,
            inout("eax") r.ax => out.ax,
            inout("ecx") r.cx => out.cx,
            inout("edx") r.dx => out.dx,
            inout("esi") r.si => out.si,
            inout("edi") r.di => out.di,
            options(nostack),
        );
    }
    out.bx = bx as u32;
    out
}

/// An open RPCI channel.
struct Channel {
    id: u32,
    cookie: (u32, u32),
}

impl Channel {
    fn open() -> Result<Self, String> {
        let r = call(Regs {
            ax: MAGIC,
            bx: RPCI,
            cx: CMD_MESSAGE | (OPEN << 16),
            dx: PORT,
            ..Regs::default()
        });
        if (r.cx >> 16) & STATUS_SUCCESS == 0 {
            return Err("backdoor: cannot open an RPCI channel".into());
        }
        Ok(Self {
            id: r.dx >> 16,
            cookie: (r.si, r.di),
        })
    }

    fn step(&self, kind: u32, bx: u32, what: &str) -> Result<Regs, String> {
        let r = call(Regs {
            ax: MAGIC,
            bx,
            cx: CMD_MESSAGE | (kind << 16),
            dx: PORT | (self.id << 16),
            si: self.cookie.0,
            di: self.cookie.1,
        });
        if (r.cx >> 16) & STATUS_SUCCESS == 0 {
            return Err(format!("backdoor: {what} failed"));
        }
        Ok(r)
    }

    fn send(&self, msg: &[u8]) -> Result<(), String> {
        let len = u32::try_from(msg.len()).map_err(|_| "backdoor: message too long")?;
        self.step(SEND_SIZE, len, "sending the size")?;
        for chunk in msg.chunks(4) {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            self.step(SEND_PAYLOAD, u32::from_le_bytes(word), "sending")?;
        }
        Ok(())
    }

    fn receive(&self) -> Result<Vec<u8>, String> {
        let r = self.step(RECV_SIZE, 0, "receiving the size")?;
        if (r.cx >> 16) & STATUS_DORECV == 0 {
            return Ok(Vec::new());
        }
        if r.bx > MAX_REPLY {
            return Err(format!("backdoor: a {}-byte reply is too long", r.bx));
        }
        let mut out = Vec::with_capacity(r.bx as usize);
        while out.len() < r.bx as usize {
            let w = self.step(RECV_PAYLOAD, STATUS_SUCCESS, "receiving")?;
            let take = (r.bx as usize - out.len()).min(4);
            out.extend_from_slice(&w.bx.to_le_bytes()[..take]);
        }
        self.step(RECV_STATUS, STATUS_SUCCESS, "acknowledging the reply")?;
        Ok(out)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        let _ = self.step(CLOSE, 0, "closing");
    }
}

/// The backdoor as an [`fork::vmware::RpcChannel`].
pub struct Backdoor;

impl fork::vmware::RpcChannel for Backdoor {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        let channel = Channel::open()?;
        channel.send(request)?;
        channel.receive()
    }
}
