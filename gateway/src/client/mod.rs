//! The client side of the registry's own protocols, run on people's machines rather than in
//! the gateway: the Docker credential helper (`docker-credential-portcullis`: SSO device
//! sign-in, refresh tokens kept per registry) and the `gateway robot` admin command.

pub mod credential_helper;
pub mod robots_cli;
