package main

import (
	"encoding/json"
	"io"
	"os"
	"testing"
	"time"

	apitypes "github.com/containerd/containerd/api/types"
	"github.com/opencontainers/runtime-spec/specs-go/features"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
)

// TestDeleteResponse: the hand-encoded answer of "delete" is the task
// API's DeleteResponse of a killed task.
func TestDeleteResponse(t *testing.T) {
	at := time.Unix(1700000000, 123456789)
	data, err := deleteResponse(at)
	require.NoError(t, err)
	var r taskAPI.DeleteResponse
	require.NoError(t, proto.Unmarshal(data, &r))
	assert.Equal(t, uint32(137), r.ExitStatus)
	assert.Equal(t, uint32(0), r.Pid)
	assert.True(t, r.ExitedAt.AsTime().Equal(at))
	assert.Empty(t, r.ProtoReflect().GetUnknown())
}

// TestInfo: -info answers the RuntimeInfo containerd's introspection
// decodes, with the features under containerd's type URL (critest's
// user-namespace and recursive read-only specs depend on it).
func TestInfo(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	stdout := os.Stdout
	os.Stdout = w
	err = writeInfo()
	os.Stdout = stdout
	w.Close()
	require.NoError(t, err)
	data, err := io.ReadAll(r)
	require.NoError(t, err)
	var info apitypes.RuntimeInfo
	require.NoError(t, proto.Unmarshal(data, &info))
	assert.Equal(t, "io.containerd.resource-slot.v1", info.Name)
	assert.Equal(t, "types.containerd.io/opencontainers/runtime-spec/1/features/Features", info.Features.GetTypeUrl())
	var f features.Features
	require.NoError(t, json.Unmarshal(info.Features.GetValue(), &f))
	assert.True(t, *f.Linux.MountExtensions.IDMap.Enabled)
	assert.Contains(t, f.MountOptions, "rro")
}
