//! The data: byte-level tokens of addition problems, `"47+35=82\n"`, generated deterministically
//! from the seed (no download). Line `i` of the training stream is a pure function of
//! `(seed, i)`; the loader reads the stream in order, so its position (the next line) is what a
//! checkpoint must keep. A fixed eighth of the `(a, b)` pairs never appears in training: the
//! held-out problems, whose exact-match accuracy is the metric.

/// SplitMix64: a small, fast, well-mixed generator; the stream is a pure function of its seed.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Whether the pair `(a, b)` is held out of training (independent of the seed).
pub fn held_out(a: u64, b: u64) -> bool {
    SplitMix::new(a.wrapping_mul(1_000_003) ^ b.rotate_left(32)).next_u64() % 8 == 0
}

/// The corpus: `digits`-digit operands.
#[derive(Debug, Clone, Copy)]
pub struct Corpus {
    pub seed: u64,
    pub digits: u32,
}

impl Corpus {
    fn pair(&self, stream: u64, i: u64, want_held_out: bool) -> (u64, u64) {
        let n = 10u64.pow(self.digits);
        let mut rng = SplitMix::new(self.seed ^ stream ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03));
        loop {
            let (a, b) = (rng.below(n), rng.below(n));
            if held_out(a, b) == want_held_out {
                return (a, b);
            }
        }
    }

    /// Line `i` of the training stream.
    pub fn train_line(&self, i: u64) -> String {
        let (a, b) = self.pair(0x7261_696E, i, false);
        format!("{a}+{b}={}\n", a + b)
    }

    /// The `n` held-out problems: `(prompt with "=", answer with "\n")`.
    pub fn held_out_problems(&self, n: usize) -> Vec<(String, String)> {
        (0..n as u64)
            .map(|i| {
                let (a, b) = self.pair(0x6576_616C, i, true);
                (format!("{a}+{b}="), format!("{}\n", a + b))
            })
            .collect()
    }
}

/// Reads the training stream in order: each sequence starts at a line and takes `seq_len + 1`
/// bytes (the lines it touches are consumed).
#[derive(Debug, Clone)]
pub struct Loader {
    pub corpus: Corpus,
    /// The next line to read: the data position a checkpoint keeps.
    pub position: u64,
}

impl Loader {
    /// A batch: `batch × seq_len` input tokens and the same number of targets (the next bytes).
    pub fn next_batch(&mut self, batch: usize, seq_len: usize) -> (Vec<u32>, Vec<u32>) {
        let mut inputs = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let mut tokens: Vec<u32> = Vec::with_capacity(seq_len + 16);
            while tokens.len() < seq_len + 1 {
                tokens.extend(self.corpus.train_line(self.position).bytes().map(u32::from));
                self.position += 1;
            }
            inputs.extend_from_slice(&tokens[..seq_len]);
            targets.extend_from_slice(&tokens[1..seq_len + 1]);
        }
        (inputs, targets)
    }
}
