//! Staged rollouts (next commit).
