//! The public URL gateway. Not built yet: see issue 4.
