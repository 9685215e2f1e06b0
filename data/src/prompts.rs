//! Prompts for generation: tokenized, then left-padded so every row's last prompt token
//! sits in the last column.

use tch::{Device, Tensor};

/// A left-padded batch of prompts, `[B, P]` each.
#[derive(Debug)]
pub struct PromptBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

pub fn collate_left(rows: &[&[i64]], pad_id: i64, device: Device) -> PromptBatch {
    let p = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len());
    let mut mask = Vec::with_capacity(rows.len());
    for r in rows {
        let pad = p - r.len();
        let mut row = vec![pad_id; pad];
        row.extend_from_slice(r);
        ids.push(row);
        let mut m = vec![0i64; pad];
        m.extend(std::iter::repeat_n(1, r.len()));
        mask.push(m);
    }
    PromptBatch {
        input_ids: Tensor::from_slice2(&ids).to_device(device),
        attention_mask: Tensor::from_slice2(&mask).to_device(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_on_the_left() {
        let b = collate_left(&[&[5, 6, 7], &[8]], 0, Device::Cpu);
        assert_eq!(
            Vec::<i64>::try_from(b.input_ids.view([-1])).unwrap(),
            [5, 6, 7, 0, 0, 8]
        );
        assert_eq!(
            Vec::<i64>::try_from(b.attention_mask.view([-1])).unwrap(),
            [1, 1, 1, 0, 0, 1]
        );
    }
}
