// fuzz-max-len: 8192
//
// Journal records: `JournalRecord.decodeHeader(_:byteOffset:)` and
// `JournalRecord.decode(_:salt:byteOffset:)` (header + every intent payload, §3).
//
// Input: mode byte, then the record bytes.
//   bit 0  fix checksum: pad to a whole header, set payloadByteCount to the bytes after
//          the header, and write the checksum (XXH3-64, seed = the fixture pool salt, of
//          header [0, 40) then the payload) at 40, as `JournalRecord.encode` does
//   bit 1  header only: also run `decodeHeader` on the bytes as they are
// Properties: never traps; an accepted record re-encodes (with the same salt) to a record
// that decodes equal and whose length is `encodedByteCount` (strict mode: to the same
// bytes, except padding records, whose payload the decoder does not inspect).
import LogPoolFormat

private let byteOffset: UInt64 = 8192 + 4096

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = fuzzBytes(data, size)
    guard let first = input.first else { return 0 }
    let mode = FuzzMode(raw: first)
    var bytes = Array(input.dropFirst())

    if mode.bit(1) {
        do throws(CorruptionError) {
            let header = try bytes.withUnsafeBytes { raw in
                Result { () throws(CorruptionError) in try JournalRecord.decodeHeader(raw, byteOffset: byteOffset) }
            }.get()
            fuzzCheck(header.payloadByteCount >= 0 && header.payloadByteCount <= JournalRecordLayout.payloadByteCountMax,
                      "header payload length \(header.payloadByteCount) out of range")
        } catch {
            _ = error.description
        }
    }

    if mode.fixChecksum {
        if bytes.count < JournalRecordLayout.headerByteCount {
            bytes += repeatElement(0, count: JournalRecordLayout.headerByteCount - bytes.count)
        }
        bytes.put32(UInt32(bytes.count - JournalRecordLayout.headerByteCount), at: JournalRecordLayout.payloadByteCountOffset)
        sealJournalRecord(&bytes, salt: FuzzFixture.salt)
    }

    do throws(CorruptionError) {
        let record = try JournalRecord.decode(bytes, salt: FuzzFixture.salt, byteOffset: byteOffset)
        let intent = record.intent
        _ = intent.kindCode
        if case .mapRun(_, let index, let id, let offset, let stored, let checksums) = intent {
            let mappings = JournalIntent.runMappings(firstBlockIndex: index, firstBlockID: id, firstByteOffset: offset,
                                                     storedByteCount: stored, checksums: checksums)
            fuzzCheck(mappings.count == checksums.count, "runMappings count")
        }
        let again = record.encode(salt: FuzzFixture.salt)
        fuzzCheck(again.count == record.encodedByteCount, "encode wrote \(again.count) bytes, encodedByteCount \(record.encodedByteCount)")
        do throws(CorruptionError) {
            let back = try JournalRecord.decode(again, salt: FuzzFixture.salt, byteOffset: byteOffset)
            fuzzCheck(back == record, "journal record round trip changed the value")
        } catch {
            fuzzFail("re-encoded journal record does not decode: \(error)")
        }
        if fuzzStrict, case .padding = intent {} else if fuzzStrict {
            fuzzCheck(again == bytes, "accepted journal record is not canonical")
        }
    } catch {
        _ = error.description
    }
    return 0
}
