//! Who may call what: ingestion API keys per data source, and an admin token for everything
//! else. Secrets are compared as SHA-256 digests in constant time, so neither their content nor
//! their length shows in response times.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use starling_core::Model;
use subtle::ConstantTimeEq;

#[derive(Default)]
pub struct Keys {
    admin: Option<[u8; 32]>,
    sources: Vec<([u8; 32], String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No credential was presented.
    Missing(&'static str),
    /// A credential was presented and is not valid.
    Invalid(&'static str),
}

impl Denied {
    pub fn message(&self) -> String {
        match self {
            Denied::Missing(what) => format!("{what} required"),
            Denied::Invalid(what) => format!("{what} is not valid"),
        }
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Keys {
    /// The model's source keys, and the admin token (`admin_token` when given, else the
    /// configuration's).
    pub fn new(model: &Model, admin_token: Option<&str>) -> Keys {
        Keys {
            admin: admin_token.or(model.server.admin_token.as_deref()).filter(|t| !t.is_empty()).map(digest),
            sources: model.sources.iter().map(|s| (digest(&s.api_key), s.name.clone())).collect(),
        }
    }

    pub fn admin_required(&self) -> bool {
        self.admin.is_some()
    }

    /// Admin requests carry `Authorization: Bearer TOKEN` when a token is configured.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(expected) = &self.admin else { return Ok(()) };
        let presented = bearer(headers).ok_or(Denied::Missing("admin token (Authorization: Bearer)"))?;
        match bool::from(digest(presented).ct_eq(expected)) {
            true => Ok(()),
            false => Err(Denied::Invalid("admin token")),
        }
    }

    /// The data source an ingestion request's key belongs to (`X-Api-Key` or `Authorization:
    /// Bearer`); `None` when no sources are configured and ingestion is open.
    pub fn check_source(&self, headers: &HeaderMap) -> Result<Option<String>, Denied> {
        if self.sources.is_empty() {
            return Ok(None);
        }
        let presented = headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| bearer(headers))
            .ok_or(Denied::Missing("API key (X-Api-Key)"))?;
        self.source_of(presented)
    }

    /// Whether ingestion needs a key (any source is declared).
    pub fn sources_required(&self) -> bool {
        !self.sources.is_empty()
    }

    /// The data source whose key `presented` is; `None` when no sources are configured.
    pub fn source_of(&self, presented: &str) -> Result<Option<String>, Denied> {
        if self.sources.is_empty() {
            return Ok(None);
        }
        let presented = digest(presented);
        // Every key is compared, so the time taken does not tell which one came close.
        let mut found = None;
        for (key, name) in &self.sources {
            if bool::from(presented.ct_eq(key)) {
                found = Some(name.clone());
            }
        }
        found.map(Some).ok_or(Denied::Invalid("API key"))
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn keys_name_their_source_and_the_admin_token_guards_the_rest() {
        let model = starling_core::parse(
            "[server]\nadmin_token = \"admin-secret-0123\"\n\
             [[source]]\nname = \"web\"\napi_key = \"web-key-0123456789\"\n\
             [[source]]\nname = \"pos\"\napi_key = \"pos-key-0123456789\"\n",
        )
        .unwrap();
        let keys = Keys::new(&model, None);
        assert_eq!(keys.check_source(&headers(&[("x-api-key", "pos-key-0123456789")])), Ok(Some("pos".into())));
        assert_eq!(
            keys.check_source(&headers(&[("authorization", "Bearer web-key-0123456789")])),
            Ok(Some("web".into()))
        );
        assert_eq!(keys.check_source(&headers(&[("x-api-key", "web-key-012345678")])), Err(Denied::Invalid("API key")));
        assert_eq!(keys.check_source(&headers(&[])), Err(Denied::Missing("API key (X-Api-Key)")));
        assert_eq!(keys.check_admin(&headers(&[("authorization", "Bearer admin-secret-0123")])), Ok(()));
        assert_eq!(
            keys.check_admin(&headers(&[("authorization", "Bearer web-key-0123456789")])),
            Err(Denied::Invalid("admin token"))
        );
        // The environment's token replaces the file's.
        let keys = Keys::new(&model, Some("from-the-environment"));
        assert!(keys.check_admin(&headers(&[("authorization", "Bearer admin-secret-0123")])).is_err());
        assert!(keys.check_admin(&headers(&[("authorization", "Bearer from-the-environment")])).is_ok());
        // Nothing configured: open.
        let open = Keys::new(&starling_core::parse("").unwrap(), None);
        assert_eq!(open.check_source(&headers(&[])), Ok(None));
        assert_eq!(open.check_admin(&headers(&[])), Ok(()));
    }
}
