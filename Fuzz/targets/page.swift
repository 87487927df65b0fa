// fuzz-max-len: 4200
//
// Metadata pages: `PageLayout.decode(_:kind:level:expectedChecksum:salt:byteOffset:)` for
// map, block-table and refcount pages, leaves and interior levels (§5), plus the tree-capacity
// arithmetic (`PageLayout.capacity`, `PageLayout.height`).
//
// Input: mode byte, selector byte, then the page bytes.
//   selector bit 0      kind: 0 map, 1 block table (bit 4 clear)
//   selector bits 1-3   expected level: 0, 1, 2, 3, 7, 8, 255, -1
//   selector bit 4      kind: refcounts
//   mode bit 0  fix checksum: cut/pad to 4096 bytes, write XXH3-64 (seed = fixture salt)
//               of [0, 4088) at 4088, and expect that checksum from the parent
//   mode bit 1  fix header: write magic, kind, level and the right slot count first
//   mode bit 2  parent pointer disagrees (expected checksum off by one)
// Without bit 0 the parent expects whatever trailer the bytes carry.
// Properties: never traps; an accepted page re-encodes to a page that decodes to the same
// words (strict mode: to the same bytes).
import LogPoolFormat

private let levels = [0, 1, 2, 3, 7, 8, 255, -1]
private let byteOffset: UInt64 = 1 << 20

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard input.count >= 2 else { return 0 }
    let mode = FuzzMode(raw: input[0])
    let selector = input[1]
    let kind: PageKind = selector & 0x10 != 0 ? .refcounts : selector & 1 == 0 ? .map : .blockTable
    let level = levels[Int(selector >> 1) & 7]
    var bytes = Array(input.dropFirst(2))

    // The capacity arithmetic the trees use on every read (saturating, never trapping).
    if bytes.count >= 8 {
        let slots = bytes.le64(at: 0)
        let height = PageLayout.height(kind: kind, coveringSlotCount: slots)
        fuzzCheck(PageLayout.capacity(kind: kind, height: height) >= slots, "height does not cover the slot count")
        _ = PageLayout.capacity(kind: kind, height: Int(selector) - 8)
    }

    if mode.bit(1) {
        bytes = fitted(bytes[...], to: PoolGeometry.pageByteCount)
        bytes.put32(PageLayout.magic, at: 0)
        bytes[4] = kind.rawValue
        bytes[5] = UInt8(truncatingIfNeeded: level)
        bytes.put32(UInt32(PageLayout.fanout(kind: kind, level: level)), at: 8)
    }
    var expected: UInt64 = 0
    if mode.fixChecksum {
        bytes = fitted(bytes[...], to: PoolGeometry.pageByteCount)
        bytes.seal(to: PageLayout.checksumOffset, seed: FuzzFixture.salt, at: PageLayout.checksumOffset)
        expected = bytes.le64(at: PageLayout.checksumOffset)
    } else if bytes.count >= PoolGeometry.pageByteCount {
        expected = bytes.le64(at: PageLayout.checksumOffset)
    }
    if mode.bit(2) { expected &+= 1 }

    do throws(CorruptionError) {
        let words = try PageLayout.decode(bytes, kind: kind, level: level, expectedChecksum: expected,
                                          salt: FuzzFixture.salt, byteOffset: byteOffset)
        fuzzCheck(words.count == PageLayout.fanout(kind: kind, level: level) * PageLayout.wordsPerSlot(kind: kind, level: level),
                  "decoded \(words.count) words")
        let (again, sum) = PageLayout.encode(kind: kind, level: level, words: words, salt: FuzzFixture.salt)
        do throws(CorruptionError) {
            let back = try PageLayout.decode(again, kind: kind, level: level, expectedChecksum: sum,
                                             salt: FuzzFixture.salt, byteOffset: byteOffset)
            fuzzCheck(back == words, "page round trip changed the words")
        } catch {
            fuzzFail("re-encoded page does not decode: \(error)")
        }
        if fuzzStrict { fuzzCheck(again == bytes, "accepted page is not canonical") }
    } catch {
        _ = error.description
    }
    return 0
}
