//! One pass over a request body: it validates the whole text by JSON's grammar (RFC 8259, as
//! serde_json judges it), holds it to the depth and number limits, and says where each
//! top-level field's key and value lie.
//!
//! Strings are nearly all of a prompt's bytes, so they are scanned 64 bytes a step (AVX2
//! where the CPU has it, looked up once a body; else SSE2, which every x86-64 has): a block of
//! plain text is passed on its compares alone, one with a special byte gives three bitmasks
//! (quotes, backslashes, control bytes), and escapes are resolved with carries across the
//! backslash mask (the method of Langdale and Lemire, "Parsing Gigabytes of JSON per Second",
//! 2019, §3.1.1), so an escape costs a few instructions in the block it is found in. A search
//! that stops at each backslash (memchr's, sonic-rs's) restarts there: ~300 instructions an
//! escape in the two passes Sluice made before, and a conversation has one every line (`\n`),
//! ~700 in 64 KiB. A block with one costs ~70 instructions here, a plain one ~35.
//!
//! Between strings (a chat request's few structural bytes) the grammar is a state machine over
//! bytes, with the nesting kept as a 128-bit stack (a bit a level: object or array), so no
//! recursion: the deepest body accepted needs no more stack than the flattest.
//!
//! Why not a crate: serde_json reads strings 8 bytes a step; sonic-rs 32, but stops at each
//! backslash and left the depth, the `\u` digits and the float range to a second pass;
//! simd-json wants a mutable copy of the body and builds a tape of every value. Sluice needs
//! less than a parser (a verdict on the grammar, and the top-level spans), and serde_json
//! stays the judge: the tests hold this walk to its verdict (the grammar's edge cases in
//! `request.rs`, the property test `json_is_judged_as_serde_json_judges_it`, strings with every
//! escape at every offset from a block's start), and it decodes every value Sluice reads.

use std::ops::Range;

use crate::ParseError;

/// A top-level field: its key's text between the quotes, whether that has escapes, and its
/// value's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawField {
    pub key: Range<usize>,
    pub key_escaped: bool,
    pub value: Range<usize>,
}

/// What the walk expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A key, or `}` (just after `{`).
    FirstKey,
    /// A key (after `,` in an object).
    Key,
    /// A value, or `]` (just after `[`).
    FirstValue,
    /// A value (after `:`, or `,` in an array).
    Value,
    /// `,` or the container's closing bracket.
    AfterValue,
}

/// Walks `json`, which must be one JSON object and nothing but whitespace around it, calling
/// `field` for each of its own fields in order. Arrays and objects may nest `limit` deep, the
/// outer object counted.
///
/// # Errors
/// [`ParseError::Json`] (where, by line and column, and what was expected),
/// [`ParseError::TooDeep`], [`ParseError::NumberOutOfRange`], or what `field` returns; the
/// first met, reading from the start.
pub(crate) fn object_fields(
    json: &[u8],
    limit: usize,
    field: impl FnMut(RawField) -> Result<(), ParseError>,
) -> Result<(), ParseError> {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = Avx2::detect() {
        return walk_avx2(avx2, json, limit, field);
    }
    walk(Native::default(), json, limit, field)
}

/// [`walk`] compiled for AVX2, the block scans inlined into it.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn walk_avx2(
    avx2: Avx2,
    json: &[u8],
    limit: usize,
    field: impl FnMut(RawField) -> Result<(), ParseError>,
) -> Result<(), ParseError> {
    #[target_feature(enable = "avx2")]
    fn walk_in(
        avx2: Avx2,
        json: &[u8],
        limit: usize,
        field: impl FnMut(RawField) -> Result<(), ParseError>,
    ) -> Result<(), ParseError> {
        walk(avx2, json, limit, field)
    }
    // SAFETY: an `Avx2` is made only where the CPU has AVX2 (`Avx2::detect`), the one feature
    // `walk_in` is compiled for.
    unsafe { walk_in(avx2, json, limit, field) }
}

/// [`object_fields`] with `blocks` scanning the strings.
#[inline(always)]
fn walk<B: Blocks>(
    blocks: B,
    json: &[u8],
    limit: usize,
    mut field: impl FnMut(RawField) -> Result<(), ParseError>,
) -> Result<(), ParseError> {
    let mut i = skip_space(json, 0);
    if json.get(i) != Some(&b'{') {
        return Err(syntax(json, i, "expected a JSON object (`{`)"));
    }
    // Bit 0 is the innermost open container, 1 for an object; 128 bits, 128 levels.
    let limit = limit.min(128);
    let mut stack: u128 = 0;
    let mut depth = 0usize;
    let mut state = State::Value;
    let mut key = 0..0;
    let mut key_escaped = false;
    let mut value_start = 0;
    loop {
        i = skip_space(json, i);
        let Some(&b) = json.get(i) else {
            return Err(syntax(json, i, "unexpected end of the body"));
        };
        // Each arm either goes on to the next byte (`continue`) or ends a value at `i`.
        match (state, b) {
            (State::FirstKey | State::Key, b'"') => {
                let (end, escaped) = string_end(blocks, json, i + 1)?;
                if depth == 1 {
                    key = i + 1..end;
                    key_escaped = escaped;
                }
                i = skip_space(json, end + 1);
                if json.get(i) != Some(&b':') {
                    return Err(syntax(json, i, "expected `:` after an object key"));
                }
                i += 1;
                state = State::Value;
                continue;
            }
            // A bracket that closes the innermost container (right after it opened, or after
            // a value in it).
            (State::FirstKey | State::FirstValue | State::AfterValue, b'}' | b']')
                if (b == b'}') == (stack & 1 == 1) =>
            {
                i += 1;
                depth -= 1;
                stack >>= 1;
            }
            (State::FirstKey | State::Key, _) => {
                return Err(syntax(json, i, "expected an object key (a string)"));
            }
            (State::FirstValue | State::Value, b'{' | b'[') => {
                if depth >= limit {
                    return Err(ParseError::TooDeep);
                }
                if depth == 1 {
                    value_start = i;
                }
                depth += 1;
                let object = b == b'{';
                stack = (stack << 1) | u128::from(object);
                state = if object {
                    State::FirstKey
                } else {
                    State::FirstValue
                };
                i += 1;
                continue;
            }
            (State::FirstValue | State::Value, _) => {
                if depth == 1 {
                    value_start = i;
                }
                i = scalar_end(blocks, json, i)?;
            }
            (State::AfterValue, b',') => {
                state = if stack & 1 == 1 {
                    State::Key
                } else {
                    State::Value
                };
                i += 1;
                continue;
            }
            (State::AfterValue, _) => {
                let what = if stack & 1 == 1 {
                    "expected `,` or `}` after an object value"
                } else {
                    "expected `,` or `]` after an array element"
                };
                return Err(syntax(json, i, what));
            }
        }
        // A value ended just before `i`.
        match depth {
            0 => {
                let end = skip_space(json, i);
                return if end == json.len() {
                    Ok(())
                } else {
                    Err(syntax(
                        json,
                        end,
                        "trailing characters after the JSON object",
                    ))
                };
            }
            1 => field(RawField {
                key: key.clone(),
                key_escaped,
                value: value_start..i,
            })?,
            _ => {}
        }
        state = State::AfterValue;
    }
}

/// The index past the string, number or literal starting at `start`.
#[inline(always)]
fn scalar_end(blocks: impl Blocks, json: &[u8], start: usize) -> Result<usize, ParseError> {
    let literal = |word: &[u8]| {
        let end = start + word.len();
        if json.get(start..end) == Some(word) {
            Ok(end)
        } else {
            Err(syntax(json, start, "expected a value"))
        }
    };
    match json.get(start) {
        Some(b'"') => string_end(blocks, json, start + 1).map(|(end, _)| end + 1),
        Some(b'-' | b'0'..=b'9') => number_end(json, start),
        Some(b't') => literal(b"true"),
        Some(b'f') => literal(b"false"),
        Some(b'n') => literal(b"null"),
        _ => Err(syntax(json, start, "expected a value")),
    }
}

/// The index past the number starting at `start`:
/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, and one a 64-bit float holds
/// (`1e999` is grammatical; no provider can read it).
fn number_end(json: &[u8], start: usize) -> Result<usize, ParseError> {
    let digits_from = |at: usize| {
        at + json
            .get(at..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    };
    let bad = || syntax(json, start, "invalid number");
    let mut i = start + usize::from(json.get(start) == Some(&b'-'));
    i = match json.get(i) {
        Some(b'0') => i + 1,
        Some(b'1'..=b'9') => digits_from(i + 1),
        _ => return Err(bad()),
    };
    if json.get(i) == Some(&b'.') {
        let end = digits_from(i + 1);
        if end == i + 1 {
            return Err(bad());
        }
        i = end;
    }
    let mut exponent = false;
    if matches!(json.get(i), Some(b'e' | b'E')) {
        exponent = true;
        i += 1 + usize::from(matches!(json.get(i + 1), Some(b'+' | b'-')));
        let end = digits_from(i);
        if end == i {
            return Err(bad());
        }
        i = end;
    }
    // Only an exponent or ~309 digits can overflow; the common number is not converted.
    if exponent || i - start > 300 {
        let text = std::str::from_utf8(&json[start..i]).unwrap_or_default();
        if text.parse::<f64>().is_ok_and(f64::is_infinite) {
            return Err(ParseError::NumberOutOfRange(
                text.chars().take(40).collect(),
            ));
        }
    }
    Ok(i)
}

/// Alternate bits, from bit 0: the even positions of a block.
const EVEN: u64 = 0x5555_5555_5555_5555;

/// Where the string whose text starts at `start` ends (the index of its closing quote), and
/// whether it has escapes; checks that it has no control bytes and only JSON's escapes.
#[inline(always)]
fn string_end(blocks: impl Blocks, json: &[u8], start: usize) -> Result<(usize, bool), ParseError> {
    let mut scan = Escapes::default();
    let mut at = start;
    let mut rest = json.get(start..).unwrap_or_default();
    while let Some((block, tail)) = rest.split_first_chunk::<64>() {
        let compared = blocks.compare(block);
        if at == start {
            // A string's first block, with one bitmask: most strings (keys, roles, a model's
            // name) end in it, unescaped.
            let special = blocks.special(&compared);
            let first = special.trailing_zeros() as usize;
            if block.get(first) == Some(&b'"') {
                return Ok((at + first, false));
            }
        }
        // A long string's blocks: plain text is passed on the compares alone (no bitmask);
        // a block with an escape (a conversation has one a line) takes the three bitmasks,
        // not the combined one first as well.
        if scan.carry != 0 || !blocks.plain(&compared) {
            let masks = blocks.masks(&compared);
            if let Some(end) = scan.block(&masks, block, json, at)? {
                return Ok((at + end, scan.has_escapes));
            }
        }
        rest = tail;
        at += 64;
    }
    // The body's last bytes, padded with `n`: not a quote, backslash or control byte, so the
    // padding can neither end the string nor fail it; and a backslash ending the body escapes
    // an `n`, as good an escape as any, leaving the string unterminated, as it is.
    let mut padded = [b'n'; 64];
    padded[..rest.len()].copy_from_slice(rest);
    let masks = blocks.masks(&blocks.compare(&padded));
    match scan.block(&masks, &padded, json, at)? {
        Some(end) => Ok((at + end, scan.has_escapes)),
        None => Err(syntax(json, json.len(), "unterminated string")),
    }
}

/// What a string's escapes carry from block to block.
#[derive(Debug, Default)]
struct Escapes {
    /// 1 when the block's first byte is escaped by a backslash ending the block before.
    carry: u64,
    /// Whether the string has had an escape so far.
    has_escapes: bool,
}

impl Escapes {
    /// Reads one block of a string (at `at` in `json`) by its bitmasks: where the string ends
    /// in it, if it does; checks its escapes and that it has no control byte.
    #[inline(always)]
    fn block(
        &mut self,
        masks: &Masks,
        block: &[u8; 64],
        json: &[u8],
        at: usize,
    ) -> Result<Option<usize>, ParseError> {
        let backslash = masks.backslash & !self.carry; // an escaped backslash escapes nothing
        let escaped = if backslash == 0 {
            std::mem::take(&mut self.carry)
        } else if backslash & (backslash << 1) == 0 {
            // No two backslashes side by side (`\n`, `\"`: nearly every escape text has):
            // each escapes the byte after it.
            let escaped = (backslash << 1) | self.carry;
            self.carry = backslash >> 63;
            escaped
        } else {
            // In a run of backslashes every other one escapes the next byte, so the byte after
            // the run is escaped when the run is odd. Adding a run's first bit to the run
            // carries it to the byte after; that byte's parity against the start's tells the
            // run's length. Runs starting on even and on odd bits are added apart, so one
            // parity test serves each; an odd-started run that reaches bit 63 carries out,
            // escaping the next block's first byte.
            let starts = backslash & !(backslash << 1);
            let after_even = backslash.wrapping_add(starts & EVEN) & !backslash;
            let (odd_sum, carry_out) = backslash.overflowing_add(starts & !EVEN);
            let after_odd = odd_sum & !backslash;
            let escaped = (after_even & !EVEN) | (after_odd & EVEN) | self.carry;
            self.carry = u64::from(carry_out);
            escaped
        };
        let quotes = masks.quote & !escaped;
        let before = quotes.wrapping_sub(1) & !quotes; // the bits before the first; all if none
        self.has_escapes |= masks.backslash & before != 0; // not those after the string
        let control = masks.control & before;
        if control != 0 {
            let at = at + control.trailing_zeros() as usize;
            return Err(syntax(json, at, "control character in a string"));
        }
        let mut check = escaped & before;
        while check != 0 {
            let n = check.trailing_zeros() as usize % 64;
            check_escape(block[n], json, at + n)?;
            check &= check - 1;
        }
        Ok((quotes != 0).then(|| quotes.trailing_zeros() as usize))
    }
}

/// JSON's escapes of one byte (`\"`, `\\`, `\/`, `\b`, `\f`, `\n`, `\r`, `\t`), indexed by
/// the byte after the backslash: one load to tell the common escape.
static SHORT_ESCAPES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 8 {
        table[b"\"\\/bfnrt"[i] as usize] = true;
        i += 1;
    }
    table
};

/// Checks `c`, the escaped byte at `at` (a backslash before it): one of JSON's escapes, `\u`
/// with four hex digits. Inlined for the common escape (a table lookup); the rest out of line.
#[inline(always)]
fn check_escape(c: u8, json: &[u8], at: usize) -> Result<(), ParseError> {
    if SHORT_ESCAPES[usize::from(c)] {
        Ok(())
    } else {
        check_unicode_escape(json, at)
    }
}

/// [`check_escape`] past the one-byte escapes: `\u` and four hex digits, or an error. A lone
/// surrogate (`\ud800`) passes, as serde_json lets it.
fn check_unicode_escape(json: &[u8], at: usize) -> Result<(), ParseError> {
    match json.get(at) {
        Some(b'u')
            if json
                .get(at + 1..at + 5)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) =>
        {
            Ok(())
        }
        _ => Err(syntax(
            json,
            at.saturating_sub(1),
            "invalid escape in a string",
        )),
    }
}

fn skip_space(json: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = json.get(i) {
        i += 1;
    }
    i
}

/// A [`ParseError::Json`] saying what was expected and where (line and column, from 1).
fn syntax(json: &[u8], at: usize, what: &str) -> ParseError {
    let before = json.get(..at).unwrap_or(json);
    let line = 1 + memchr::memchr_iter(b'\n', before).count();
    let column = 1 + before.len() - memchr::memrchr(b'\n', before).map_or(0, |nl| nl + 1);
    ParseError::Json(format!("{what} at line {line} column {column}"))
}

/// A block's bytes that are `"`, `\` and below 0x20, as bits (bit n for byte n).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Masks {
    quote: u64,
    backslash: u64,
    control: u64,
}

/// How a block is scanned: [`Blocks::compare`] compares its bytes with `"`, `\` and 0x1f;
/// from that, [`Blocks::special`] says where any of the three is (one bitmask: the compares
/// are combined first), [`Blocks::plain`] whether there is none (no bitmask at all) and
/// [`Blocks::masks`] where each is. Each way gives the same answers (tested against
/// [`Bytewise`]); they differ in speed.
trait Blocks: Copy {
    /// A block's bytes compared, in the registers of the way.
    type Compared;

    fn compare(self, block: &[u8; 64]) -> Self::Compared;

    fn special(self, compared: &Self::Compared) -> u64;

    fn plain(self, compared: &Self::Compared) -> bool {
        self.special(compared) == 0
    }

    fn masks(self, compared: &Self::Compared) -> Masks;
}

/// Byte by byte: the reference the others are tested against, and the scan where there is
/// no SIMD this file knows (the compiler vectorises what it can).
#[derive(Debug, Default, Clone, Copy)]
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
struct Bytewise;

impl Blocks for Bytewise {
    type Compared = Masks;

    fn compare(self, block: &[u8; 64]) -> Masks {
        let mut m = Masks::default();
        for (n, &b) in block.iter().enumerate() {
            m.quote |= u64::from(b == b'"') << n;
            m.backslash |= u64::from(b == b'\\') << n;
            m.control |= u64::from(b < 0x20) << n;
        }
        m
    }

    fn special(self, m: &Masks) -> u64 {
        m.quote | m.backslash | m.control
    }

    fn masks(self, m: &Masks) -> Masks {
        *m
    }
}

/// The scan every machine of this architecture has.
#[cfg(target_arch = "x86_64")]
type Native = Sse2;
#[cfg(not(target_arch = "x86_64"))]
type Native = Bytewise;

/// SSE2, in every x86-64: 16 bytes a compare, four per block.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Default, Clone, Copy)]
struct Sse2;

/// A block's 16-byte lanes compared: per lane, `"`, `\` and below 0x20.
#[cfg(target_arch = "x86_64")]
type Sse2Compared = [[std::arch::x86_64::__m128i; 3]; 4];

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Blocks for Sse2 {
    type Compared = Sse2Compared;

    #[inline(always)]
    fn compare(self, block: &[u8; 64]) -> Sse2Compared {
        use std::arch::x86_64::{
            __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_set1_epi8,
            _mm_setzero_si128,
        };
        // SAFETY: SSE2 is part of x86-64, so every x86-64 CPU runs these intrinsics; and each
        // load reads a 16-byte lane of `block`, all readable, with no alignment required.
        unsafe {
            let quote = _mm_set1_epi8(b'"' as i8);
            let backslash = _mm_set1_epi8(b'\\' as i8);
            let below_space = _mm_set1_epi8(0x1f);
            // Plain loops over fixed arrays: `array::map` and `flatten` were compiled as calls
            // here, not inlined into the walk, and made the SSE2 walk ~7x slower.
            let mut lanes = [[_mm_setzero_si128(); 3]; 4];
            for (compared, lane) in lanes.iter_mut().zip(block.chunks_exact(16)) {
                let v = _mm_loadu_si128(lane.as_ptr().cast::<__m128i>());
                *compared = [
                    _mm_cmpeq_epi8(v, quote),
                    _mm_cmpeq_epi8(v, backslash),
                    // max(byte, 0x1f) == 0x1f exactly when byte <= 0x1f, unsigned.
                    _mm_cmpeq_epi8(_mm_max_epu8(v, below_space), below_space),
                ];
            }
            lanes
        }
    }

    #[inline(always)]
    fn special(self, lanes: &Sse2Compared) -> u64 {
        use std::arch::x86_64::{_mm_movemask_epi8, _mm_or_si128};
        let mut special = 0;
        for (n, [quote, backslash, control]) in lanes.iter().enumerate() {
            // SAFETY: SSE2, as in `compare`.
            let bits = unsafe {
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(*quote, *backslash), *control))
            };
            special |= u64::from(bits as u16) << (16 * n);
        }
        special
    }

    #[inline(always)]
    fn plain(self, lanes: &Sse2Compared) -> bool {
        use std::arch::x86_64::{_mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128};
        // SAFETY: SSE2, as in `compare`.
        unsafe {
            let mut any = _mm_setzero_si128();
            for [quote, backslash, control] in lanes {
                any = _mm_or_si128(
                    any,
                    _mm_or_si128(_mm_or_si128(*quote, *backslash), *control),
                );
            }
            _mm_movemask_epi8(any) == 0
        }
    }

    #[inline(always)]
    fn masks(self, lanes: &Sse2Compared) -> Masks {
        use std::arch::x86_64::{__m128i, _mm_movemask_epi8};
        // SAFETY: SSE2, as in `compare`.
        let bits = |v: __m128i| u64::from(unsafe { _mm_movemask_epi8(v) } as u16);
        let mut m = Masks::default();
        for (n, [quote, backslash, control]) in lanes.iter().enumerate() {
            m.quote |= bits(*quote) << (16 * n);
            m.backslash |= bits(*backslash) << (16 * n);
            m.control |= bits(*control) << (16 * n);
        }
        m
    }
}

/// AVX2: 32 bytes a compare, two per block. Made only by [`Avx2::detect`], so holding one is
/// the proof that this CPU runs AVX2.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    fn detect() -> Option<Self> {
        std::arch::is_x86_feature_detected!("avx2").then_some(Self(()))
    }
}

/// A block's two 32-byte lanes compared: per lane, `"`, `\` and below 0x20.
#[cfg(target_arch = "x86_64")]
type Avx2Compared = [[std::arch::x86_64::__m256i; 3]; 2];

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
impl Blocks for Avx2 {
    type Compared = Avx2Compared;

    #[inline(always)]
    fn compare(self, block: &[u8; 64]) -> Avx2Compared {
        // SAFETY: `self` exists, so the CPU has AVX2 (see `Avx2`).
        unsafe { avx2_compare(block) }
    }

    #[inline(always)]
    fn special(self, lanes: &Avx2Compared) -> u64 {
        // SAFETY: as in `compare`.
        unsafe { avx2_special(lanes) }
    }

    #[inline(always)]
    fn plain(self, lanes: &Avx2Compared) -> bool {
        // SAFETY: as in `compare`.
        unsafe { avx2_plain(lanes) }
    }

    #[inline(always)]
    fn masks(self, lanes: &Avx2Compared) -> Masks {
        // SAFETY: as in `compare`.
        unsafe { avx2_masks(lanes) }
    }
}

// The AVX2 scans, each inlined into `walk_avx2` and compiled for AVX2 with it (checked: no
// symbol of theirs in the release binary).

/// [`Blocks::compare`] for [`Avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
#[allow(unsafe_code)]
fn avx2_compare(block: &[u8; 64]) -> Avx2Compared {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_max_epu8, _mm256_set1_epi8,
        _mm256_setzero_si256,
    };
    let quote = _mm256_set1_epi8(b'"' as i8);
    let backslash = _mm256_set1_epi8(b'\\' as i8);
    let below_space = _mm256_set1_epi8(0x1f);
    // A plain loop, as in `Sse2::compare`.
    let mut lanes = [[_mm256_setzero_si256(); 3]; 2];
    for (compared, lane) in lanes.iter_mut().zip(block.chunks_exact(32)) {
        // SAFETY: `lane` is 32 bytes of `block`, all readable; the load has no alignment
        // requirement.
        let v = unsafe { _mm256_loadu_si256(lane.as_ptr().cast::<__m256i>()) };
        *compared = [
            _mm256_cmpeq_epi8(v, quote),
            _mm256_cmpeq_epi8(v, backslash),
            _mm256_cmpeq_epi8(_mm256_max_epu8(v, below_space), below_space),
        ];
    }
    lanes
}

/// [`Blocks::special`] for [`Avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn avx2_special(lanes: &Avx2Compared) -> u64 {
    use std::arch::x86_64::{_mm256_movemask_epi8, _mm256_or_si256};
    let mut special = 0;
    for (n, [quote, backslash, control]) in lanes.iter().enumerate() {
        let any = _mm256_or_si256(_mm256_or_si256(*quote, *backslash), *control);
        special |= u64::from(_mm256_movemask_epi8(any) as u32) << (32 * n);
    }
    special
}

/// [`Blocks::plain`] for [`Avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn avx2_plain(lanes: &Avx2Compared) -> bool {
    use std::arch::x86_64::{_mm256_or_si256, _mm256_testz_si256};
    let [[q0, b0, c0], [q1, b1, c1]] = *lanes;
    let any = _mm256_or_si256(
        _mm256_or_si256(_mm256_or_si256(q0, b0), _mm256_or_si256(c0, q1)),
        _mm256_or_si256(b1, c1),
    );
    _mm256_testz_si256(any, any) == 1
}

/// [`Blocks::masks`] for [`Avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn avx2_masks(lanes: &Avx2Compared) -> Masks {
    use std::arch::x86_64::{__m256i, _mm256_movemask_epi8};
    let bits = |v: __m256i| u64::from(_mm256_movemask_epi8(v) as u32);
    let mut m = Masks::default();
    for (n, [quote, backslash, control]) in lanes.iter().enumerate() {
        m.quote |= bits(*quote) << (32 * n);
        m.backslash |= bits(*backslash) << (32 * n);
        m.control |= bits(*control) << (32 * n);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A way of scanning blocks, by name: what it finds in a block.
    type Scan = (&'static str, Box<dyn Fn(&[u8; 64]) -> (Masks, u64, bool)>);

    /// What `blocks` finds in `block`: its masks, its special bytes and whether it is plain,
    /// from one compare.
    fn scan<B: Blocks>(blocks: B, block: &[u8; 64]) -> (Masks, u64, bool) {
        let compared = blocks.compare(block);
        let found = (
            blocks.masks(&compared),
            blocks.special(&compared),
            blocks.plain(&compared),
        );
        assert_eq!(found.2, found.1 == 0, "plain: no special byte");
        found
    }

    /// Every way of scanning blocks this machine has, the reference first.
    fn scans() -> Vec<Scan> {
        let mut all: Vec<Scan> = vec![("bytewise", Box::new(|b| scan(Bytewise, b)))];
        #[cfg(target_arch = "x86_64")]
        {
            all.push(("sse2", Box::new(|b| scan(Sse2, b))));
            if let Some(avx2) = Avx2::detect() {
                all.push(("avx2", Box::new(move |b| scan(avx2, b))));
            }
        }
        all
    }

    /// The fields `object_fields` finds, checked to be what the walk finds with each way of
    /// scanning blocks.
    fn fields(json: &str) -> Result<Vec<RawField>, ParseError> {
        fn with(blocks: impl Blocks, json: &str) -> Result<Vec<RawField>, ParseError> {
            let mut out = Vec::new();
            walk(blocks, json.as_bytes(), 128, |f| {
                out.push(f);
                Ok(())
            })?;
            Ok(out)
        }
        let mut out = Vec::new();
        let found = object_fields(json.as_bytes(), 128, |f| {
            out.push(f);
            Ok(())
        })
        .map(|()| out);
        assert_eq!(found, with(Bytewise, json), "{json}");
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(found, with(Sse2, json), "{json}");
            if let Some(avx2) = Avx2::detect() {
                assert_eq!(found, with(avx2, json), "{json}");
            }
        }
        found
    }

    #[test]
    fn every_scan_finds_the_bytes_compared_one_by_one() {
        let mixed: [u8; 64] = std::array::from_fn(|n| match n % 7 {
            0 => b'"',
            1 => b'\\',
            2 => n as u8 % 0x20,
            3 => 0x1f + (n as u8 % 3), // 0x1f, 0x20, 0x21 at the edge
            4 => 0x80 | n as u8,       // UTF-8 continuation and lead bytes are text
            _ => b'a' + n as u8 % 26,
        });
        let text: [u8; 64] = std::array::from_fn(|n| 0x20 + ((n * 7) % 0x60) as u8);
        let text = text.map(|b| if b == b'"' || b == b'\\' { b'a' } else { b });
        let mut blocks = vec![mixed, text];
        for (n, special) in [(0, b'"'), (17, b'\\'), (31, 0x1f), (32, b'"'), (63, 0)] {
            let mut one = text;
            one[n] = special;
            blocks.push(one);
        }
        let (m, ..) = scan(Bytewise, &mixed);
        assert!(m.quote != 0 && m.backslash != 0 && m.control != 0);
        assert_eq!(m.control & (1 << 4), 0, "0x84 is not a control byte");
        assert!(scan(Bytewise, &text).1 == 0 && scan(Bytewise, &blocks[2]).1 == 1);
        for block in &blocks {
            let reference = scan(Bytewise, block);
            for (name, scan) in scans() {
                assert_eq!(scan(block), reference, "{name}: {block:?}");
            }
        }
    }

    /// Keys and values are where they are written; nested fields are not top-level ones.
    #[test]
    fn top_level_fields_are_found_with_their_spans() {
        let text = r#" { "a" : [1, {"b": 2}] ,"c\"d":"x\\", "e":{}, "f":-1.5e3,"g":null } "#;
        let found = fields(text).unwrap();
        let shown: Vec<(&str, bool, &str)> = found
            .iter()
            .map(|f| (&text[f.key.clone()], f.key_escaped, &text[f.value.clone()]))
            .collect();
        assert_eq!(
            shown,
            [
                ("a", false, r#"[1, {"b": 2}]"#),
                (r#"c\"d"#, true, r#""x\\""#),
                ("e", false, "{}"),
                ("f", false, "-1.5e3"),
                ("g", false, "null"),
            ]
        );
        assert_eq!(fields("{}").unwrap(), []);
    }

    /// Escapes of every kind (and bad ones, and control bytes) at every offset from a block's
    /// start, runs of backslashes across a block's end included: the string ends where
    /// serde_json says, and reads as serde_json reads it, or both refuse it.
    #[test]
    fn strings_are_judged_as_serde_json_judges_them_wherever_the_blocks_fall() {
        let pieces = [
            r"\n",
            r"\\",
            r#"\""#,
            r#"\\\""#,
            r"\\\\",
            r"\u00e9",
            r"\ud83d\ude00",
            r"\/",
            r"\x",
            r"\u12",
            "\u{1}",
            "\t",
            "\u{7f}",
            "é",
        ];
        for piece in pieces {
            for offset in 0..140 {
                let value = format!(
                    r#""{}{piece}{}""#,
                    "a".repeat(offset),
                    "b".repeat(offset % 67)
                );
                // Positioned so the string's text starts at several block alignments.
                let text = format!(r#"{{"key":{value},"n":1}}"#);
                let expected = serde_json::from_str::<String>(&value).ok();
                match fields(&text) {
                    Ok(found) => {
                        let got = &text[found[0].value.clone()];
                        assert_eq!(got, value, "{piece:?} at {offset}");
                        assert!(expected.is_some(), "{piece:?} at {offset}: accepted");
                        assert_eq!(found.len(), 2);
                    }
                    Err(e) => assert!(expected.is_none(), "{piece:?} at {offset}: {e}"),
                }
            }
        }
    }

    /// Every ASCII byte after a backslash (and a multi-byte character) is taken or refused
    /// as serde_json takes it.
    #[test]
    fn every_escape_is_judged_as_serde_json_judges_it() {
        let after = (0u8..128).map(char::from).chain(['é', '€']);
        for c in after {
            for tail in ["", "0041", "00e9x"] {
                let value = format!(r#""a\{c}{tail}b""#);
                let text = format!(r#"{{"k":{value}}}"#);
                let serde_ok = serde_json::from_str::<String>(&value).is_ok();
                assert_eq!(fields(&text).is_ok(), serde_ok, "{value:?}");
            }
        }
    }

    /// Runs of 1 to 9 backslashes ending on each side of a block boundary: an odd run escapes
    /// the quote after it (the string goes on), an even one does not (it ends there).
    #[test]
    fn backslash_runs_across_block_ends_escape_by_their_parity() {
        for run in 1..10 {
            for offset in 50..80 {
                let text = format!(
                    r#"{{"k":"{}{}"x","n":1}}"#,
                    "a".repeat(offset),
                    "\\".repeat(run)
                );
                let result = fields(&text);
                let serde_ok = serde_json::from_str::<
                    std::collections::BTreeMap<String, serde_json::Value>,
                >(&text)
                .is_ok();
                assert_eq!(
                    result.is_ok(),
                    serde_ok,
                    "run {run} at {offset}: {result:?}"
                );
                if let Ok(found) = result {
                    let value = &text[found[0].value.clone()];
                    assert!(value.ends_with("\"x\""), "run {run} at {offset}: {value}");
                }
            }
        }
    }

    #[test]
    fn errors_say_where() {
        let err = fields("{\n  \"a\": 1,\n  \"b\" 2\n}").unwrap_err();
        assert_eq!(
            err,
            ParseError::Json("expected `:` after an object key at line 3 column 7".into())
        );
        // A body ending in a string, and in one whose last byte is a backslash (it escapes
        // nothing: the string is not closed, rather than badly escaped), at every length
        // around a block's end.
        for n in 58..72 {
            let text = "b".repeat(n);
            for body in [format!(r#"{{"a":"{text}"#), format!(r#"{{"a":"{text}\"#)] {
                assert!(
                    matches!(fields(&body), Err(ParseError::Json(m)) if m.starts_with("unterminated string")),
                    "{body}"
                );
            }
        }
        assert!(matches!(fields("[]"), Err(ParseError::Json(m)) if m.contains("object")));
    }
}
