//! The userfaultfd monitor (in progress).
