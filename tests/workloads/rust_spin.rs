//! Ground truth for demangling: CPU time in generic Rust methods inside a module.
//! Usage: rust_spin SECONDS

mod engine {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    pub struct Spinner<T> {
        pub state: T,
    }

    impl<T: Copy + std::ops::Add<Output = T>> Spinner<T> {
        #[inline(never)]
        pub fn spin_for(&mut self, step: T, how_long: Duration) {
            let end = Instant::now() + how_long;
            while Instant::now() < end {
                for _ in 0..2000 {
                    self.state = black_box(self.state + step);
                }
            }
        }
    }
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(5.0);
    let mut spinner = engine::Spinner { state: 0u64 };
    spinner.spin_for(1, std::time::Duration::from_secs_f64(seconds));
    println!("{}", spinner.state);
}
