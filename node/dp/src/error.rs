//! Why a calibration, a conversion, an accuracy or a release could not be
//! computed. Messages name the parameter and its value, or what OpenDP
//! was asked to do and the kind of error it returned; never a value of
//! the data (a release fails without saying anything of its input).

/// A failure of this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpError {
    /// A parameter outside its domain: a cost, a delta, a level, a
    /// sensitivity, a number of participants.
    #[error("{0}")]
    Invalid(String),
    /// No noise scale meets the cost asked for.
    #[error("{0}")]
    NoScale(String),
    /// OpenDP refused or failed: what it was asked to do, and the kind of
    /// error it returned.
    #[error("{what}: {kind}")]
    OpenDp {
        /// What was asked, e.g. "cannot build the mechanism".
        what: String,
        /// OpenDP's error kind (`ErrorVariant`).
        kind: String,
    },
}

impl DpError {
    /// OpenDP's error `e` while doing `what`.
    pub(crate) fn opendp(what: impl Into<String>, e: opendp::error::Error) -> DpError {
        DpError::OpenDp {
            what: what.into(),
            kind: format!("{:?}", e.variant),
        }
    }
}

/// For callers that report errors as text (gRPC statuses, the node's
/// answer checks): the message.
impl From<DpError> for String {
    fn from(e: DpError) -> String {
        e.to_string()
    }
}
