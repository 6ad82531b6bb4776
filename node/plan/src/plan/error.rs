//! Why a query is refused: a kind callers can match on, and a message
//! written for the analyst (what is wrong and what to write instead).
//!
//! Every refusal depends on the query and the schema only, never on the
//! data (DESIGN invariant 2), so the same query against the same declared
//! schema is refused the same way by every node and by the coordinator's
//! own planning.

use std::fmt::Display;

/// The kind of a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PlanErrorKind {
    /// The text is not SQL, or not exactly one SELECT statement.
    Syntax,
    /// A construct outside the SQL subset fedq answers ([`super::SQL_SUBSET`]);
    /// the message names the supported rewrite where there is one.
    Unsupported,
    /// A column, dataset or public table the schema does not declare, or a
    /// column that may not be used (the privacy unit's person identifier).
    UnknownName,
    /// A literal or argument that is not valid where it stands: a label
    /// outside the declared domain, a quantile outside `[0, 1]`, a column
    /// of the wrong type for the aggregate.
    Invalid,
    /// A per-row expression whose bounds cannot be derived from the
    /// declared metadata, or exceed [`super::MAX_EXPR_BOUND`].
    Unbounded,
    /// The query exceeds a limit: cells, values, operators, nesting,
    /// branches, bins.
    TooLarge,
}

/// A query that failed validation, with a message meant for the analyst.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlanError {
    kind: PlanErrorKind,
    message: String,
}

impl PlanError {
    /// A refusal of kind `kind`.
    pub fn new(kind: PlanErrorKind, message: impl Into<String>) -> Self {
        PlanError {
            kind,
            message: message.into(),
        }
    }

    /// What kind of refusal this is.
    pub fn kind(&self) -> PlanErrorKind {
        self.kind
    }

    /// The message for the analyst.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same refusal, its message prefixed with where it arose
    /// (`"{at}: {message}"`), e.g. the aggregate a condition belongs to.
    pub(crate) fn at(self, at: impl Display) -> Self {
        PlanError {
            kind: self.kind,
            message: format!("{at}: {}", self.message),
        }
    }

    pub(crate) fn syntax(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Syntax, message)
    }
    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Unsupported, message)
    }
    pub(crate) fn unknown_name(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::UnknownName, message)
    }
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Invalid, message)
    }
    pub(crate) fn unbounded(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::Unbounded, message)
    }
    pub(crate) fn too_large(message: impl Into<String>) -> Self {
        Self::new(PlanErrorKind::TooLarge, message)
    }
}

/// `Err` of [`PlanErrorKind::Unsupported`].
pub(crate) fn unsupported<T>(message: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::unsupported(message))
}
/// `Err` of [`PlanErrorKind::Invalid`].
pub(crate) fn invalid<T>(message: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::invalid(message))
}
/// `Err` of [`PlanErrorKind::Unbounded`].
pub(crate) fn unbounded<T>(message: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::unbounded(message))
}
/// `Err` of [`PlanErrorKind::TooLarge`].
pub(crate) fn too_large<T>(message: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError::too_large(message))
}
