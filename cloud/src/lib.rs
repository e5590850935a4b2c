//! backhaul-cloud: ingest that stores every batch exactly once. Not built yet (issue #4).
