//! The shape every stage's error takes in this crate: `Refused`, said in
//! words that name the `node.toml` key or the file and what to do, and
//! `Io`, what was being done and the cause's text (not repeated as a
//! `source()`, so `{:#}` prints it once). Each stage declares its own
//! enum with [`stage_error`], adding variants of its own where a caller
//! must tell them apart (`server::ServeError::Stopped`).

/// Declares a stage's error enum: its doc, its name, and any extra
/// variants; gives it a private `io(what, cause)` constructor.
macro_rules! stage_error {
    ($(#[$doc:meta])* $name:ident { $($extra:tt)* }) => {
        $(#[$doc])*
        #[derive(Debug, thiserror::Error)]
        pub enum $name {
            /// Refused, saying what is wrong and what to do.
            #[error("{0}")]
            Refused(String),
            /// An operation failed: what was being done, and why (the
            /// cause's text is in the message, not repeated as a source).
            #[error("{what}: {cause}")]
            Io {
                /// What was being done.
                what: String,
                /// The cause, in words.
                cause: String,
            },
            $($extra)*
        }

        impl $name {
            fn io(what: impl Into<String>, cause: impl std::fmt::Display) -> Self {
                $name::Io {
                    what: what.into(),
                    cause: cause.to_string(),
                }
            }
        }
    };
}
pub(crate) use stage_error;
