//! Which schools a node serves, and so which changes it keeps (contract
//! §2, "Filtering and transfers") and which schools a resync or an export
//! covers.

use std::collections::BTreeSet;

use uuid::Uuid;

/// Which schools a node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchoolFilter {
    All,
    Only(BTreeSet<Uuid>),
}

impl SchoolFilter {
    pub fn serves(&self, school: Uuid) -> bool {
        match self {
            SchoolFilter::All => true,
            SchoolFilter::Only(ids) => ids.contains(&school),
        }
    }

    /// The schools a resync run or an export covers: those `given`, else
    /// the served ones, else (serving all) the schools the store knows,
    /// which `known` lists.
    pub fn schools_to_sync<E>(
        &self,
        given: Vec<Uuid>,
        known: impl FnOnce() -> Result<Vec<Uuid>, E>,
    ) -> Result<Vec<Uuid>, E> {
        if !given.is_empty() {
            return Ok(given);
        }
        match self {
            SchoolFilter::Only(ids) => Ok(ids.iter().copied().collect()),
            SchoolFilter::All => known(),
        }
    }
}
