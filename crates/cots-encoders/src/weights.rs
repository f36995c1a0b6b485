//! TODO(owner): see docs/ARCHITECTURE.md
