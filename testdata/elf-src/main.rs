//! A tiny bare-metal program whose only purpose is to be turned into ESP-IDF
//! app images by the vendor tools (espflash, esptool) for mqota's golden tests.
//! It never runs; it only has to look like an app: an `esp_app_desc_t` at the
//! start of DROM and some code in IROM.
#![no_std]
#![no_main]

/// Mirrors ESP-IDF's `esp_app_desc_t` (256 bytes).
#[repr(C)]
pub struct EspAppDesc {
    magic_word: u32,
    secure_version: u32,
    reserv1: [u32; 2],
    version: [u8; 32],
    project_name: [u8; 32],
    time: [u8; 16],
    date: [u8; 16],
    idf_ver: [u8; 32],
    app_elf_sha256: [u8; 32],
    min_efuse_blk_rev_full: u16,
    max_efuse_blk_rev_full: u16,
    mmu_page_size: u8,
    reserv3: [u8; 3],
    reserv2: [u32; 18],
}

const fn padded<const N: usize>(s: &str) -> [u8; N] {
    let b = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < b.len() && i < N - 1 {
        out[i] = b[i];
        i += 1;
    }
    out
}

const fn parse_u32(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut v = 0u32;
    let mut i = 0;
    while i < b.len() {
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

#[no_mangle]
#[used]
#[link_section = ".flash.appdesc"]
pub static esp_app_desc: EspAppDesc = EspAppDesc {
    magic_word: 0xABCD_5432,
    secure_version: parse_u32(env!("GOLDEN_SECURE_VERSION")),
    reserv1: [0; 2],
    version: padded(env!("GOLDEN_VERSION")),
    project_name: padded(env!("GOLDEN_PROJECT")),
    time: padded("12:00:00"),
    date: padded("Jan  1 2026"),
    idf_ver: padded("golden"),
    app_elf_sha256: [0; 32],
    min_efuse_blk_rev_full: 0,
    max_efuse_blk_rev_full: 99,
    mmu_page_size: 16,
    reserv3: [0; 3],
    reserv2: [0; 18],
};

static TABLE: [u32; 8] = [1, 1, 2, 3, 5, 8, 13, 21];

#[no_mangle]
pub extern "C" fn _start() -> ! {
    let mut acc = 0u32;
    loop {
        for (i, v) in TABLE.iter().enumerate() {
            // Volatile so the table and descriptor stay referenced.
            acc = acc.wrapping_mul(31).wrapping_add(unsafe { core::ptr::read_volatile(v) } + i as u32);
        }
        acc ^= unsafe { core::ptr::read_volatile(&esp_app_desc.secure_version) };
        if acc == 0 {
            unsafe { core::ptr::write_volatile(0x6000_0000 as *mut u32, acc) };
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
