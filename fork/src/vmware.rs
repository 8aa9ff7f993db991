//! VMware's side of a fork (Instant Clone): the guest freezes itself with the
//! backdoor RPC `instantclone.freeze` (each clone returns from that call) and
//! reads its identity with `info-get guestinfo.tether.identity`. The messages
//! go over an [`RpcChannel`]; the guest runtime provides the real backdoor,
//! the tests a fake.

/// The freeze command: the call returns in each clone (and, with no clone,
/// in the frozen VM when it is let go).
pub const FREEZE: &str = "instantclone.freeze";
/// The guestinfo key that holds the identity.
pub const IDENTITY_KEY: &str = "guestinfo.tether.identity";

/// One request/reply exchange with the hypervisor (VMware's RPCI: the reply
/// starts with `1 ` for success or `0 ` for failure).
pub trait RpcChannel {
    fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, String>;
}

/// Splits an RPCI reply into success and the text after the status.
fn reply(request: &str, bytes: &[u8]) -> Result<(bool, Vec<u8>), String> {
    match bytes {
        [b'1', rest @ ..] => Ok((true, strip_space(rest).to_vec())),
        [b'0', rest @ ..] => Ok((false, strip_space(rest).to_vec())),
        _ => Err(format!(
            "{request}: malformed reply {:?}",
            String::from_utf8_lossy(bytes)
        )),
    }
}

fn strip_space(b: &[u8]) -> &[u8] {
    b.strip_prefix(b" ").unwrap_or(b)
}

/// Freezes the VM for an instant clone; returns once running again.
pub fn freeze(ch: &mut impl RpcChannel) -> Result<(), String> {
    let (ok, text) = reply(FREEZE, &ch.call(FREEZE.as_bytes())?)?;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{FREEZE} refused: {}",
            String::from_utf8_lossy(&text)
        ))
    }
}

/// Reads the identity from guestinfo; `None` when the key is not set.
pub fn identity(ch: &mut impl RpcChannel) -> Result<Option<Vec<u8>>, String> {
    let request = format!("info-get {IDENTITY_KEY}");
    let (ok, value) = reply(&request, &ch.call(request.as_bytes())?)?;
    // A key that is not set is a failure reply ("No value found").
    Ok(ok.then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers from a script and records the requests.
    struct Fake {
        replies: Vec<Result<Vec<u8>, String>>,
        sent: Vec<String>,
    }

    impl RpcChannel for Fake {
        fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
            self.sent
                .push(String::from_utf8_lossy(request).into_owned());
            self.replies.remove(0)
        }
    }

    fn fake(replies: &[Result<&[u8], &str>]) -> Fake {
        Fake {
            replies: replies
                .iter()
                .map(|r| r.map(<[u8]>::to_vec).map_err(str::to_owned))
                .collect(),
            sent: Vec::new(),
        }
    }

    #[test]
    fn freeze_sends_the_instant_clone_command() {
        let mut ch = fake(&[
            Ok(b"1 "),
            Ok(b"0 Permission denied"),
            Ok(b"?"),
            Err("no backdoor"),
        ]);
        assert_eq!(freeze(&mut ch), Ok(()));
        assert_eq!(ch.sent, ["instantclone.freeze"]);
        assert_eq!(
            freeze(&mut ch).unwrap_err(),
            "instantclone.freeze refused: Permission denied"
        );
        assert!(freeze(&mut ch).unwrap_err().contains("malformed reply"));
        assert_eq!(freeze(&mut ch).unwrap_err(), "no backdoor");
    }

    #[test]
    fn the_identity_comes_from_guestinfo() {
        let mut ch = fake(&[Ok(b"1 {\"generation\": 3}  "), Ok(b"0 No value found")]);
        assert_eq!(
            identity(&mut ch).unwrap().unwrap(),
            b"{\"generation\": 3}  "
        );
        assert_eq!(identity(&mut ch).unwrap(), None);
        assert_eq!(ch.sent[0], "info-get guestinfo.tether.identity");
    }
}
