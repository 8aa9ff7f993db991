//! ML-KEM-768 encapsulation from given randomness.
//!
//! aws-lc-rs encapsulates with aws-lc's own DRBG, which lives in the process's
//! memory. A VM fork clones that memory: every child of one parent would draw
//! the same encapsulation randomness until aws-lc happened to reseed (it does
//! not notice a VM fork; only the kernel's pool is reseeded by the child's
//! recovery). The server side of `mlkem768x25519-sha256` therefore takes its
//! 32 bytes from the injected RNG, like every other random value here, through
//! aws-lc's `EVP_PKEY_encapsulate_deterministic` (FIPS 203 `Encaps_internal`).

use aws_lc_sys::{
    EVP_PKEY_CTX_free, EVP_PKEY_CTX_new, EVP_PKEY_encapsulate_deterministic, EVP_PKEY_free,
    EVP_PKEY_kem_new_raw_public_key, NID_MLKEM768,
};

use super::CryptoError;

/// ML-KEM-768's encapsulation key, ciphertext and shared secret sizes.
pub const PUBLIC: usize = 1184;
pub const CIPHERTEXT: usize = 1088;
const SECRET: usize = 32;

/// Encapsulates to `ek` with the randomness `m`: the ciphertext and the
/// shared secret. The same `m` and `ek` always give the same result, so `m`
/// must be fresh and secret.
#[allow(unsafe_code)]
pub fn encapsulate(ek: &[u8], m: &[u8; 32]) -> Result<(Vec<u8>, [u8; SECRET]), CryptoError> {
    if ek.len() != PUBLIC {
        return Err(CryptoError);
    }
    let mut ciphertext = vec![0u8; CIPHERTEXT];
    let mut secret = [0u8; SECRET];
    let (mut ct_len, mut ss_len, mut m_len) = (CIPHERTEXT, SECRET, m.len());
    // SAFETY: every pointer is valid for the length passed beside it for the
    // duration of the calls; aws-lc copies `ek`, writes at most `*_len` bytes
    // to the outputs and reads `m_len` bytes of `m`. The key and context are
    // checked for null and freed exactly once, on every path.
    let ok = unsafe {
        let pkey = EVP_PKEY_kem_new_raw_public_key(NID_MLKEM768, ek.as_ptr(), ek.len());
        if pkey.is_null() {
            return Err(CryptoError);
        }
        let ctx = EVP_PKEY_CTX_new(pkey, std::ptr::null_mut());
        let ok = !ctx.is_null()
            && EVP_PKEY_encapsulate_deterministic(
                ctx,
                ciphertext.as_mut_ptr(),
                &mut ct_len,
                secret.as_mut_ptr(),
                &mut ss_len,
                m.as_ptr(),
                &mut m_len,
            ) == 1;
        EVP_PKEY_CTX_free(ctx);
        EVP_PKEY_free(pkey);
        ok
    };
    if !ok || ct_len != CIPHERTEXT || ss_len != SECRET {
        return Err(CryptoError);
    }
    Ok((ciphertext, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::kem::{Ciphertext, DecapsulationKey, ML_KEM_768};

    #[test]
    fn the_holder_of_the_decapsulation_key_gets_the_same_secret() {
        let dk = DecapsulationKey::generate(&ML_KEM_768).unwrap();
        let ek = dk.encapsulation_key().unwrap();
        let ek = ek.key_bytes().unwrap();
        let (ct, secret) = encapsulate(ek.as_ref(), &[7; 32]).unwrap();
        let theirs = dk.decapsulate(Ciphertext::from(ct.as_slice())).unwrap();
        assert_eq!(theirs.as_ref(), secret);
    }

    #[test]
    fn the_randomness_decides_the_result() {
        let dk = DecapsulationKey::generate(&ML_KEM_768).unwrap();
        let ek = dk.encapsulation_key().unwrap();
        let ek = ek.key_bytes().unwrap();
        let a = encapsulate(ek.as_ref(), &[1; 32]).unwrap();
        assert_eq!(a, encapsulate(ek.as_ref(), &[1; 32]).unwrap());
        assert_ne!(a, encapsulate(ek.as_ref(), &[2; 32]).unwrap());
    }

    #[test]
    fn a_malformed_key_is_refused() {
        assert!(encapsulate(&[0; PUBLIC - 1], &[1; 32]).is_err());
    }
}
