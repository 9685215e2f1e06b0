//! Datasets of every stage: JSON Lines readers, tokenization with chat templates, loss
//! masks, collation and seeded resumable sampling (issue 4 fills this crate).
