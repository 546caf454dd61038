use thiserror::Error;

/// What can go wrong asking the fleet.
#[derive(Debug, Error)]
pub enum FleetError {
    #[error("Redis failed")]
    Redis(#[from] redis::RedisError),
    #[error("the customer id is not one this system stores: {0:?}")]
    InvalidCustomerId(String),
}
