import Foundation
import LogPool
import LogPoolFormat
import LogPoolTesting
import Testing

/// The superblock slot matrix of Specs/CRASH-MODEL.md §6 (TigerBeetle's quorum
/// table style): ten contents for slot A times ten for slot B, each of the 100 cases
/// with its expected choice written in the grid below.
///
/// The chain of commits is A8 → B9 → A10 → B11 → A12 → B13 (each slot's parent checksum
/// is the previous one's checksum; even generations live in slot A, odd in B, FORMAT
/// SB-1 parity). Codes: `A`/`B` that slot chosen, nothing reported; `a`/`b` that slot
/// chosen and the other reported (damaged, stale or not its parent); `X` corrupt
/// (no valid slot, or two pools); `Z` corrupt "not a LogPool pool" (no magic in either
/// slot: a torn slot is random bytes here, so it has no magic either).
@Suite("Superblock slot matrix")
struct SlotMatrixTests {
    static let rows = ["A10", "A10-fork", "A12", "A10-wrong-parent", "A8", "torn", "zeros", "copy-of-B", "other-pool", "future-version"]
    static let columns = ["B9", "B11", "B11-wrong-parent", "B9-fork", "B13", "torn", "zeros", "copy-of-A", "other-pool", "future-version"]
    /// rows × columns, in the orders above.
    static let expected = [
        "A B b a b a a a X a",  // A10: parent of B11, child of B9
        "A b b a b a a a X a",  // A10-fork: B11 names the real A10 as parent
        "a A a a b a a a X a",  // A12: child of B11; B9 and B13 are two apart
        "a b b a b a a a X a",  // A10-wrong-parent
        "B b b B b a a a X a",  // A8: parent of B9 (and of the fork, which keeps B9's parent)
        "b b b b b Z Z X b X",  // torn: random bytes have no magic, like zeros
        "b b b b b Z Z X b X",  // zeros
        "b b b b b X X X b X",  // copy-of-B: slot index mismatch (a misdirected write)
        "X X X X X a a a a a",  // other-pool: valid, but not this pool's; with B other-pool too, a chain check
        "b b b b b X X X b X",  // future-version
    ]

    @Test("each of the 100 slot pairs chooses as the table says, at 512- and 4096-byte sectors", arguments: [512, 4096])
    func matrix(sector: Int) throws {
        let slots = try Self.variants(sector: sector)
        var mismatches: [String] = []
        for (i, row) in Self.rows.enumerated() {
            let codes = Self.expected[i].split(separator: " ").map(String.init)
            #expect(codes.count == Self.columns.count)
            for (j, column) in Self.columns.enumerated() {
                let a = Result { () throws(CorruptionError) in try Superblock.decode(slots.a[row]!, slotIndex: 0) }
                let b = Result { () throws(CorruptionError) in try Superblock.decode(slots.b[column]!, slotIndex: 1) }
                let got: String
                do {
                    let choice = try chooseSuperblock(a, b)
                    let letter = choice.chosen.slotIndex == 0 ? "A" : "B"
                    got = choice.otherSlotProblem == nil ? letter : letter.lowercased()
                } catch {
                    got = error.detail.hasPrefix("not a LogPool pool") ? "Z" : "X"
                }
                if got != codes[j] { mismatches.append("A=\(row) B=\(column): expected \(codes[j]), got \(got)") }
            }
        }
        #expect(mismatches.isEmpty, "\(mismatches.joined(separator: "\n"))")
    }

    @Test("the slots are in different 4 KiB pages, so one torn physical sector damages only one")
    func slotsApart() {
        let offsets = PoolGeometry.superblockSlotByteOffsets
        #expect(offsets[0] / 4096 != offsets[1] / 4096)
    }

    /// The ten contents of each slot, built from a real pool's slot: `sector` is the
    /// size of what a torn write garbles (the slot's 512 bytes, or its whole 4 KiB page,
    /// of which the slot is the first 512).
    static func variants(sector: Int) throws -> (a: [String: [UInt8]], b: [String: [UInt8]]) {
        let (pool, device) = try makePool()
        try pool.checkpoint()
        let image = device.durable
        let chosen = try Superblock.decode(Array(image[0..<512]), slotIndex: 0).generation
            > (try Superblock.decode(Array(image[4096..<4608]), slotIndex: 1)).generation ? 0 : 1
        let offset = Int(PoolGeometry.superblockSlotByteOffsets[chosen])
        let base = try Superblock.decode(Array(image[offset..<offset + 512]), slotIndex: chosen)
        func slot(_ generation: UInt64, parent: UInt64, time: Int64 = 0, uuid: [UInt8]? = nil) -> Superblock {
            var sb = base
            sb.generation = generation
            sb.slotIndex = Int(generation % 2)
            sb.parentChecksum = parent
            sb.createdTime = base.createdTime + time
            if let uuid { sb.poolUUID = uuid }
            return sb
        }
        let a8 = slot(8, parent: 7)
        let b9 = slot(9, parent: a8.checksum)
        let a10 = slot(10, parent: b9.checksum)
        let b11 = slot(11, parent: a10.checksum)
        let a12 = slot(12, parent: b11.checksum)
        let b13 = slot(13, parent: 0xBAD)
        let other = [UInt8](repeating: 0x77, count: 16)
        var generator = SeededGenerator(seed: UInt64(sector))
        let torn = (0..<sector).map { _ in UInt8.random(in: 0...255, using: &generator) }
        func future(_ sb: Superblock) -> [UInt8] {
            var bytes = sb.encode()
            bytes[SuperblockLayout.formatVersionOffset] = UInt8(PoolGeometry.formatVersion + 1)
            let sum = Checksum.xxh3(Array(bytes[0..<SuperblockLayout.checksumOffset]))
            withUnsafeBytes(of: sum.littleEndian) { for i in 0..<8 { bytes[SuperblockLayout.checksumOffset + i] = $0[i] } }
            return bytes
        }
        let a: [String: [UInt8]] = [
            "A10": a10.encode(), "A10-fork": slot(10, parent: b9.checksum, time: 1).encode(), "A12": a12.encode(),
            "A10-wrong-parent": slot(10, parent: 0xBAD).encode(), "A8": a8.encode(), "torn": Array(torn[0..<512]),
            "zeros": [UInt8](repeating: 0, count: 512), "copy-of-B": b9.encode(),
            "other-pool": slot(10, parent: b9.checksum, uuid: other).encode(), "future-version": future(a10),
        ]
        let b: [String: [UInt8]] = [
            "B9": b9.encode(), "B11": b11.encode(), "B11-wrong-parent": slot(11, parent: 0xBAD).encode(),
            "B9-fork": slot(9, parent: a8.checksum, time: 1).encode(), "B13": b13.encode(), "torn": Array(torn[(sector - 512)..<sector]),
            "zeros": [UInt8](repeating: 0, count: 512), "copy-of-A": a10.encode(),
            "other-pool": slot(9, parent: a8.checksum, uuid: other).encode(), "future-version": future(b9),
        ]
        return (a, b)
    }
}
