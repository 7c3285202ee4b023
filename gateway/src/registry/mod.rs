//! The `/v2/` path: the bearer check and what may be forwarded ([`authz`]), and the storage
//! nodes it is forwarded to ([`upstream`]).

pub mod authz;
pub mod upstream;
