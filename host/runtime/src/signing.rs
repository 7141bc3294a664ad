//! Plugin signatures (ed25519). A signature covers the exact manifest text and the component's
//! sha256, so neither the code nor its declared limits and allowed hosts can change unnoticed.
//! It lives in `plugin.sig` next to the manifest: `ed25519 PUBLIC_KEY_HEX SIGNATURE_HEX`.

use crate::error::SignatureError;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

pub const SIGNATURE_FILE: &str = "plugin.sig";

fn message(manifest: &str, component_sha256: &str) -> Vec<u8> {
    format!("starling-plugin-signature-v1\n{component_sha256}\n{manifest}").into_bytes()
}

/// A new key pair, as hex: (secret, public).
pub fn generate() -> Result<(String, String), SignatureError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| SignatureError::NoRandomness(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    Ok((hex::encode(key.to_bytes()), hex::encode(key.verifying_key().to_bytes())))
}

/// The content of `plugin.sig` for a manifest and component, signed with a hex secret key.
pub fn sign(secret_hex: &str, manifest: &str, component_sha256: &str) -> Result<String, SignatureError> {
    let bytes: [u8; 32] =
        hex::decode(secret_hex.trim()).ok().and_then(|b| b.try_into().ok()).ok_or(SignatureError::SecretKey)?;
    let key = SigningKey::from_bytes(&bytes);
    let signature = key.sign(&message(manifest, component_sha256));
    Ok(format!("ed25519 {} {}\n", hex::encode(key.verifying_key().to_bytes()), hex::encode(signature.to_bytes())))
}

/// Reads a trusted-keys file: one hex public key per line; `#` starts a comment.
pub fn parse_trusted_keys(text: &str) -> Result<Vec<String>, SignatureError> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            let key = l.split_whitespace().next().unwrap_or(l);
            let ok = hex::decode(key).ok().and_then(|b| <[u8; 32]>::try_from(b).ok()).is_some();
            if ok {
                Ok(key.to_ascii_lowercase())
            } else {
                Err(SignatureError::TrustedKey { line: i + 1, key: key.to_string() })
            }
        })
        .collect()
}

/// Checks a `plugin.sig` against the manifest and component; returns the signer's public key.
/// With `trusted` given, the signer must be one of them.
pub fn verify(
    signature_file: &str,
    manifest: &str,
    component_sha256: &str,
    trusted: Option<&[String]>,
) -> Result<String, SignatureError> {
    let parts: Vec<&str> = signature_file.split_whitespace().collect();
    let [scheme, public, signature] = parts[..] else {
        return Err(SignatureError::Format);
    };
    if scheme != "ed25519" {
        return Err(SignatureError::Scheme(scheme.to_string()));
    }
    let public = public.to_ascii_lowercase();
    let key_bytes: [u8; 32] =
        hex::decode(&public).ok().and_then(|b| b.try_into().ok()).ok_or(SignatureError::PublicKey)?;
    let sig_bytes: [u8; 64] =
        hex::decode(signature).ok().and_then(|b| b.try_into().ok()).ok_or(SignatureError::Signature)?;
    let key = VerifyingKey::from_bytes(&key_bytes).map_err(|_| SignatureError::PublicKey)?;
    key.verify(&message(manifest, component_sha256), &Signature::from_bytes(&sig_bytes))
        .map_err(|_| SignatureError::Mismatch)?;
    if let Some(trusted) = trusted
        && !trusted.contains(&public)
    {
        return Err(SignatureError::Untrusted(public));
    }
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_manifest_and_component() {
        let (secret, public) = generate().unwrap();
        let sig = sign(&secret, "name = \"x\"", "abc").unwrap();
        assert_eq!(verify(&sig, "name = \"x\"", "abc", Some(std::slice::from_ref(&public))), Ok(public.clone()));
        assert_eq!(verify(&sig, "name = \"y\"", "abc", None), Err(SignatureError::Mismatch), "manifest changed");
        assert_eq!(verify(&sig, "name = \"x\"", "abd", None), Err(SignatureError::Mismatch), "component changed");
        let (_, other) = generate().unwrap();
        assert_eq!(verify(&sig, "name = \"x\"", "abc", Some(&[other])), Err(SignatureError::Untrusted(public.clone())));
    }

    #[test]
    fn trusted_keys_files() {
        let (_, public) = generate().unwrap();
        assert_eq!(parse_trusted_keys(&format!("# ops team\n{public} release key\n\n")).unwrap(), vec![public]);
        assert_eq!(
            parse_trusted_keys("nope").unwrap_err().to_string(),
            "line 1: `nope` is not a 64-hex-digit public key"
        );
    }
}
