// fuzz-max-len: 1100
//
// Superblock slots: `Superblock.decode(_:slotIndex:)` and `chooseSuperblock`.
//
// Input: mode byte, then slot bytes.
//   bit 0  fix checksum: cut/pad each slot to 512 bytes and write the XXH3-64 (seed 0) of
//          [0, 504) at 504, so the fuzzer gets past the checksum to the field checks
//   bit 1  decode as slot B (slot index 1) instead of slot A
//   bit 2  pair: bytes [0, 512) are slot A and [512, 1024) slot B; decode both and run
//          `chooseSuperblock` on the two results
// Without bit 0 the bytes are decoded as they are (any length).
// Properties: never traps; an accepted slot re-encodes to a slot that decodes equal
// (strict mode: to the same bytes).
import LogPoolFormat

private func decodeSlot(_ bytes: [UInt8], slot: Int) -> Result<Superblock, CorruptionError> {
    do throws(CorruptionError) {
        let sb = try Superblock.decode(bytes, slotIndex: slot)
        let again = sb.encode()
        fuzzCheck(again.count == SuperblockLayout.byteCount, "encode length \(again.count)")
        do throws(CorruptionError) {
            let back = try Superblock.decode(again, slotIndex: slot)
            fuzzCheck(back == sb, "superblock round trip changed the value")
        } catch {
            fuzzFail("re-encoded superblock does not decode: \(error)")
        }
        if fuzzStrict { fuzzCheck(again == bytes, "accepted superblock is not canonical") }
        _ = sb.poolSalt
        _ = sb.isMounted
        _ = sb.geometry.dataAreaEndByteOffset
        return .success(sb)
    } catch {
        _ = error.description
        return .failure(error)
    }
}

private func prepared(_ bytes: ArraySlice<UInt8>, fix: Bool) -> [UInt8] {
    guard fix else { return Array(bytes) }
    var slot = fitted(bytes, to: SuperblockLayout.byteCount)
    slot.seal(to: SuperblockLayout.checksumOffset, seed: 0, at: SuperblockLayout.checksumOffset)
    return slot
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard let first = input.first else { return 0 }
    let mode = FuzzMode(raw: first)
    let body = input.dropFirst()
    if mode.bit(2) {
        let split = body.startIndex + min(body.count, SuperblockLayout.byteCount)
        let a = decodeSlot(prepared(body[..<split], fix: mode.fixChecksum), slot: 0)
        let b = decodeSlot(prepared(body[split...], fix: mode.fixChecksum), slot: 1)
        do throws(CorruptionError) {
            let choice = try chooseSuperblock(a, b)
            fuzzCheck(choice.chosen.slotIndex == 0 || choice.chosen.slotIndex == 1, "chosen slot index")
            _ = choice.otherSlotProblem
        } catch {
            _ = error.description
        }
    } else {
        _ = decodeSlot(prepared(body, fix: mode.fixChecksum), slot: mode.bit(1) ? 1 : 0)
    }
    return 0
}
