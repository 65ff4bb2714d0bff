//! Errors as one log line with their causes: libraries wrap the cause that says what went wrong
//! ("transport error" over "Connection refused"), and many repeat it in their own text.

use std::error::Error;

/// `error` and each of its causes, each once ("failed to start watching object: client error
/// (Connect): tcp connect error: Connection refused").
pub(crate) fn chain(error: &dyn Error) -> String {
    with_causes(error.to_string(), error.source())
}

/// `text` followed by `source` and its causes, each cause left out when the text so far
/// already has it.
pub(crate) fn with_causes(mut text: String, mut source: Option<&dyn Error>) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    const REFUSED: &str = "tcp connect error: Connection refused";

    #[test]
    fn each_cause_is_named_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("failed to start watching object: client error (Connect)")]
        struct Outer(#[source] io::Error);
        assert_eq!(
            chain(&Outer(io::Error::other(REFUSED))),
            "failed to start watching object: client error (Connect): tcp connect error: \
             Connection refused"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("watch failed: {0}")]
        struct Repeating(#[source] io::Error);
        assert_eq!(
            chain(&Repeating(io::Error::other(REFUSED))),
            "watch failed: tcp connect error: Connection refused"
        );
    }
}
