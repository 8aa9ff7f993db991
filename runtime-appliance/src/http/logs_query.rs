//! The logs route's parameters, and how a gap in the middle of a logs or
//! attach stream is reported.

use std::time::SystemTime;

use crate::api_types::LogsOptions;
use crate::http::backend::Session;

use super::query::Query;
use super::response::HttpError;

/// `from`, `follow`, `timestamps`, `since`, `tail` (a count or `all`).
pub fn options(query: &Query) -> Result<LogsOptions, HttpError> {
    query.check(
        "logs",
        &["follow", "from", "timestamps", "since", "tail"],
        &[],
    )?;
    let since = query
        .get("since")
        .map(|v| crate::logs::parse_since(v, SystemTime::now()))
        .transpose()
        .map_err(|e| HttpError::bad_request(format!("query parameter {e}")))?;
    let tail = match query.get("tail") {
        None => None,
        Some(v) if v.eq_ignore_ascii_case("all") => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            HttpError::bad_request(format!(
                "query parameter tail={v:?} is neither a line count nor \"all\""
            ))
        })?),
    };
    Ok(LogsOptions {
        from: query.u64("from", 0)?,
        follow: query.bool("follow", false)?,
        timestamps: query.bool("timestamps", false)?,
        since,
        tail,
    })
}

/// What aborts a stream at a gap of `lost` bytes after `session.offset()`:
/// the message names where the bytes resume.
pub fn gap_message<S: Session>(session: &S, lost: u64) -> String {
    let at = session.offset() - lost;
    format!(
        "{lost} bytes of output lost at offset {at}; resume from={}",
        session.offset()
    )
}

/// A logs body error for a gap.
pub fn gap_error<S: Session>(session: &S, lost: u64) -> std::io::Error {
    tracing::info!(
        id = session.id(),
        lost,
        "output lost mid-stream; aborting the stream"
    );
    std::io::Error::other(gap_message(session, lost))
}
