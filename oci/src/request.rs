//! One parse of a whole `/v2/` request — method, path *and* query — into the operation
//! storage performs: [`Request`], and back into the one URI that stands for it,
//! [`Request::uri`].
//!
//! The gateway decides on a `Request` and forwards `request.uri()`, never the client's own
//! URI; storage parses what it receives with the same [`parse`]. So whatever the client wrote
//! (repeated or unknown parameters, odd encodings, huge values), storage performs exactly the
//! operation the gateway authorized, and `parse(uri())` gives back the same `Request` (a
//! property test holds the two together). A parameter the endpoint reads that appears twice is
//! refused: no side may pick "the first" while another picks "the last".

use crate::digest::Digest;
use crate::error::{ErrorCode, OciError};
use crate::name::RepositoryName;
use crate::route::{Endpoint, RouteError, parse_route};

/// A parsed `/v2/` request: the endpoint and the query parameters it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub endpoint: Endpoint,
    pub params: Params,
}

/// The query parameters of the distribution API. Each is set only on the endpoints that read
/// it; anything else in a query is ignored, and is not part of [`Request::uri`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// `?mount=<digest>[&from=<name>]` on an upload start.
    pub mount: Option<Mount>,
    /// `?digest=` on an upload start (monolithic upload) or finish.
    pub digest: Option<Digest>,
    /// `?n=` on the catalog and tag lists (`n=` empty is no limit).
    pub n: Option<usize>,
    /// `?last=` on the catalog and tag lists.
    pub last: Option<String>,
    /// `?artifactType=` on the referrers list (`artifactType=` empty is no filter).
    pub artifact_type: Option<String>,
}

/// A cross-repository mount: the blob, and the repository to take it from (without `from`,
/// storage starts a plain upload session, as the spec says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub digest: Digest,
    pub from: Option<RepositoryName>,
}

/// Why a request is not one storage would perform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("the query parameter {0} is given more than once")]
    Repeated(&'static str),
    #[error("{param}: {message}")]
    Digest {
        param: &'static str,
        message: String,
    },
    #[error("from: {0}")]
    From(String),
    #[error("n must be a non-negative integer, not {0:?}")]
    PageSize(String),
}

impl From<RequestError> for OciError {
    fn from(e: RequestError) -> Self {
        let msg = e.to_string();
        match e {
            RequestError::Route(r) => r.into(),
            RequestError::Repeated(_) => {
                OciError::new(ErrorCode::Unsupported, msg).with_status(400)
            }
            RequestError::Digest { .. } => OciError::new(ErrorCode::DigestInvalid, msg),
            RequestError::From(_) => OciError::new(ErrorCode::NameInvalid, msg),
            RequestError::PageSize(_) => OciError::new(ErrorCode::PaginationNumberInvalid, msg),
        }
    }
}

/// The query's values for the keys an endpoint reads: each at most once.
struct Query<'a> {
    pairs: Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
}

impl<'a> Query<'a> {
    fn new(query: Option<&'a str>) -> Self {
        Query {
            pairs: form_urlencoded::parse(query.unwrap_or("").as_bytes()).collect(),
        }
    }

    fn get(&self, key: &'static str) -> Result<Option<&str>, RequestError> {
        let mut found = self.pairs.iter().filter(|(k, _)| k == key);
        let first = found.next().map(|(_, v)| v.as_ref());
        if found.next().is_some() {
            return Err(RequestError::Repeated(key));
        }
        Ok(first)
    }

    fn digest(&self, key: &'static str) -> Result<Option<Digest>, RequestError> {
        self.get(key)?
            .map(|s| {
                Digest::parse(s).map_err(|e| RequestError::Digest {
                    param: key,
                    message: e.to_string(),
                })
            })
            .transpose()
    }
}

/// Parses a request. `path` is the raw path (not percent-decoded), `query` the raw query.
pub fn parse(method: &str, path: &str, query: Option<&str>) -> Result<Request, RequestError> {
    let endpoint = parse_route(method, path)?;
    let q = Query::new(query);
    let mut params = Params::default();
    match &endpoint {
        Endpoint::StartUpload { .. } => {
            if let Some(digest) = q.digest("mount")? {
                let from = q
                    .get("from")?
                    .map(|f| {
                        RepositoryName::parse(f).map_err(|e| RequestError::From(e.to_string()))
                    })
                    .transpose()?;
                params.mount = Some(Mount { digest, from });
            } else {
                // Unread without a mount, but never ambiguous either.
                q.get("from")?;
            }
            params.digest = q.digest("digest")?;
        }
        Endpoint::FinishUpload { .. } => params.digest = q.digest("digest")?,
        Endpoint::Catalog | Endpoint::ListTags { .. } => {
            params.n = match q.get("n")? {
                None | Some("") => None,
                Some(s) => Some(
                    s.parse::<usize>()
                        .map_err(|_| RequestError::PageSize(s.chars().take(32).collect()))?,
                ),
            };
            params.last = q.get("last")?.map(str::to_owned);
        }
        Endpoint::Referrers { .. } => {
            params.artifact_type = q
                .get("artifactType")?
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
        }
        _ => {}
    }
    Ok(Request { endpoint, params })
}

impl Request {
    /// The one URI (path and query) that stands for this request: what the gateway forwards.
    pub fn uri(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        let p = &self.params;
        if let Some(m) = &p.mount {
            q.append_pair("mount", &m.digest.to_string());
            if let Some(from) = &m.from {
                q.append_pair("from", from.as_str());
            }
        }
        if let Some(d) = &p.digest {
            q.append_pair("digest", &d.to_string());
        }
        if let Some(n) = p.n {
            q.append_pair("n", &n.to_string());
        }
        if let Some(last) = &p.last {
            q.append_pair("last", last);
        }
        if let Some(t) = &p.artifact_type {
            q.append_pair("artifactType", t);
        }
        let query = q.finish();
        let path = self.endpoint.path();
        if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        }
    }

    /// Every repository the request reads or writes: its own, and a mount's `from`.
    pub fn repositories(&self) -> impl Iterator<Item = &RepositoryName> {
        let from = self.params.mount.as_ref().and_then(|m| m.from.as_ref());
        self.endpoint.repository().into_iter().chain(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn round_trip(method: &str, uri: &str) -> Request {
        let (path, query) = uri
            .split_once('?')
            .map_or((uri, None), |(p, q)| (p, Some(q)));
        let r = parse(method, path, query).unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
        let again = r.uri();
        let (p2, q2) = again
            .split_once('?')
            .map_or((again.as_str(), None), |(p, q)| (p, Some(q)));
        assert_eq!(parse(method, p2, q2).unwrap(), r, "{uri} -> {again}");
        r
    }

    #[test]
    fn a_mount_with_its_source_is_one_operation() {
        let r = round_trip(
            "POST",
            &format!("/v2/a/b/blobs/uploads/?mount={D}&from=team-b/x"),
        );
        let m = r.params.mount.as_ref().unwrap();
        assert_eq!(m.from.as_ref().unwrap().as_str(), "team-b/x");
        assert_eq!(
            r.repositories().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["a/b", "team-b/x"]
        );
    }

    #[test]
    fn a_repeated_parameter_the_endpoint_reads_is_refused() {
        let q = format!("mount={D}&from=a&from=team-b/x");
        assert_eq!(
            parse("POST", "/v2/a/blobs/uploads/", Some(&q)),
            Err(RequestError::Repeated("from"))
        );
        let e = OciError::from(parse("POST", "/v2/a/blobs/uploads/", Some(&q)).unwrap_err());
        assert_eq!((e.status, e.code), (400, ErrorCode::Unsupported));
        // `from` is never ambiguous, even where no mount reads it.
        let q = "from=a&from=b";
        assert!(parse("POST", "/v2/a/blobs/uploads/", Some(q)).is_err());
        assert!(parse("GET", "/v2/_catalog", Some("n=1&n=2")).is_err());
        // Parameters the endpoint does not read may repeat; they are not forwarded.
        let r = round_trip("GET", "/v2/a/manifests/v1?x=1&x=2");
        assert_eq!(r.uri(), "/v2/a/manifests/v1");
    }

    #[test]
    fn encoded_keys_and_values_are_read_as_storage_reads_them() {
        let q = format!(
            "%6Dount={}&fr%6Fm=team-b%2Fx&pad={}",
            D.replace(':', "%3A"),
            "/".repeat(30_000)
        );
        let r = parse("POST", "/v2/a/blobs/uploads/", Some(&q)).unwrap();
        assert_eq!(
            r.params
                .mount
                .as_ref()
                .unwrap()
                .from
                .as_ref()
                .unwrap()
                .as_str(),
            "team-b/x"
        );
        assert_eq!(
            r.uri(),
            format!(
                "/v2/a/blobs/uploads/?mount={}&from=team-b%2Fx",
                D.replace(':', "%3A")
            )
        );
    }

    #[test]
    fn bad_parameters_get_their_protocol_errors() {
        let code =
            |m: &str, p: &str, q: &str| OciError::from(parse(m, p, Some(q)).unwrap_err()).code;
        assert_eq!(
            code("POST", "/v2/a/blobs/uploads/", "mount=x"),
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            code("POST", "/v2/a/blobs/uploads/", &format!("mount={D}&from=A")),
            ErrorCode::NameInvalid
        );
        assert_eq!(
            code("PUT", "/v2/a/blobs/uploads/id", "digest=sha256:1"),
            ErrorCode::DigestInvalid
        );
        assert_eq!(
            code("GET", "/v2/a/tags/list", "n=-1"),
            ErrorCode::PaginationNumberInvalid
        );
    }

    #[test]
    fn every_endpoint_round_trips() {
        for (m, uri) in [
            ("GET", "/v2/".to_string()),
            ("GET", "/v2/_catalog?n=10&last=a%2Fb".into()),
            ("GET", "/v2/a/tags/list?n=&last=v%201".into()),
            ("HEAD", format!("/v2/a/manifests/{D}")),
            ("PUT", "/v2/a/manifests/v1".into()),
            ("DELETE", "/v2/a/manifests/v1".into()),
            ("GET", format!("/v2/a/blobs/{D}")),
            ("DELETE", format!("/v2/a/blobs/{D}")),
            ("POST", format!("/v2/a/blobs/uploads/?digest={D}")),
            ("POST", format!("/v2/a/blobs/uploads/?mount={D}")),
            ("GET", "/v2/a/blobs/uploads/abc-1".into()),
            ("PATCH", "/v2/a/blobs/uploads/abc-1".into()),
            ("PUT", format!("/v2/a/blobs/uploads/abc-1?digest={D}")),
            ("DELETE", "/v2/a/blobs/uploads/abc-1".into()),
            (
                "GET",
                format!("/v2/a/referrers/{D}?artifactType=application%2Fx"),
            ),
        ] {
            round_trip(m, &uri);
        }
    }
}
