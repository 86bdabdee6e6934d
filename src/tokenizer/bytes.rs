//! A token's raw bytes, for logprob entries (OpenAI's `bytes`): a token
//! that holds part of a UTF-8 character decodes to U+FFFD on its own, and
//! clients put characters back together from these bytes.

use tokenizers::decoders::DecoderWrapper;

/// How a vocabulary writes bytes in its token strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pieces {
    /// GPT-2's byte-level BPE: each byte is one printable character.
    ByteLevel,
    /// Text, with `<0xHH>` tokens for single bytes (SentencePiece byte fallback).
    Text,
}

impl Pieces {
    pub(crate) fn of(decoder: Option<&DecoderWrapper>) -> Self {
        fn byte_level(d: &DecoderWrapper) -> bool {
            match d {
                DecoderWrapper::ByteLevel(_) => true,
                DecoderWrapper::Sequence(s) => s.get_decoders().iter().any(byte_level),
                _ => false,
            }
        }
        if decoder.is_some_and(byte_level) { Pieces::ByteLevel } else { Pieces::Text }
    }
}

/// The byte GPT-2's byte-to-unicode table maps to `c`: printable Latin-1
/// bytes stand for themselves, the other 68 were moved to U+0100.. in
/// byte order. (The tokenizers crate keeps its table private.)
fn byte_of(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    let code = c as u32;
    if printable(code) {
        return u8::try_from(code).ok();
    }
    let n = code.checked_sub(0x100)?;
    (0u32..=0xFF).filter(|&b| !printable(b)).nth(n as usize).and_then(|b| u8::try_from(b).ok())
}

/// `<0xHH>`: one byte.
fn fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The bytes of vocabulary entry `piece`; `None` when it is not written in
/// the scheme (the caller then uses the decoded text).
pub(crate) fn piece_bytes(pieces: Pieces, piece: &str) -> Option<Vec<u8>> {
    match pieces {
        Pieces::ByteLevel => piece.chars().map(byte_of).collect(),
        Pieces::Text => fallback_byte(piece).map(|b| vec![b]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_has_one_byte_level_character_and_it_maps_back() {
        let mut seen = std::collections::HashSet::new();
        for c in (0x21u32..0x17F).filter_map(char::from_u32) {
            if let Some(b) = byte_of(c) {
                assert!(seen.insert(b), "byte {b} mapped twice");
            }
        }
        assert_eq!(seen.len(), 256);
        // GPT-2's table: space is Ġ (U+0120), newline Ċ (U+010A), 0xF0 is ð.
        assert_eq!(byte_of('Ġ'), Some(b' '));
        assert_eq!(byte_of('Ċ'), Some(b'\n'));
        assert_eq!(byte_of('ð'), Some(0xF0));
        assert_eq!(piece_bytes(Pieces::ByteLevel, "ĠcafÃ©"), Some(" café".as_bytes().to_vec()));
    }

    #[test]
    fn byte_fallback_pieces_are_one_byte_and_other_text_is_left_to_the_decoder() {
        assert_eq!(piece_bytes(Pieces::Text, "<0xF0>"), Some(vec![0xF0]));
        assert_eq!(piece_bytes(Pieces::Text, "<0xF>"), None);
        assert_eq!(piece_bytes(Pieces::Text, "▁Hello"), None);
    }
}
